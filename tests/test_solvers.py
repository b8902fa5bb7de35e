import pytest
import torch
from diffusers import DDIMScheduler

from lcm.schedule import NoiseSchedule, scaled_linear_alphas_cumprod
from lcm.solvers import SOLVERS, ddim_solver, get_solver

SCHED = NoiseSchedule(scaled_linear_alphas_cumprod())


def test_ddim_with_exact_x0_eps_lands_on_analytic_point():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t, s = torch.tensor([999, 519, 39]), torch.tensor([979, 499, 19])
    z_t = SCHED.add_noise(x0, eps, t)
    z_s = ddim_solver(lambda z, tt: (x0, eps), z_t, t, s, SCHED)
    alpha_s, sigma_s = SCHED.alpha_sigma(s, 4)
    torch.testing.assert_close(z_s, alpha_s * x0 + sigma_s * eps)


def test_ddim_equals_diffusers_ddim_scheduler_step():
    # One DDIM step 519 → 499 with an epsilon model; diffusers with 50 leading steps uses exactly that pair.
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(50)
    t_int = 520
    s_int = t_int - 20
    assert t_int in sched.timesteps.tolist()
    g = torch.Generator().manual_seed(1)
    z_t, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    theirs = sched.step(eps, t_int, z_t).prev_sample

    def denoise(z, t):
        alpha, sigma = SCHED.alpha_sigma(t, z.ndim)
        return (z - sigma * eps) / alpha, eps

    ours = ddim_solver(denoise, z_t, torch.tensor([t_int] * 2), torch.tensor([s_int] * 2), SCHED)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_registry_unknown_name_lists_valid():
    assert "ddim" in SOLVERS
    with pytest.raises(ValueError, match="ddim"):
        get_solver("rk45")
