import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler

from lcm.schedule import NoiseSchedule, SolverGrid, lcm_inference_timesteps, scaled_linear_alphas_cumprod


def test_alphas_cumprod_matches_diffusers_scaled_linear():
    ours = scaled_linear_alphas_cumprod()
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=1e-7)


def test_alpha_sigma_unit_norm_and_monotone():
    s = NoiseSchedule(scaled_linear_alphas_cumprod())
    t = torch.arange(1000)
    alpha, sigma = s.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(1000))
    assert (alpha[1:] < alpha[:-1]).all()


def test_grid_pairs_are_k_apart_and_clamped():
    grid = SolverGrid(1000, 50)
    assert grid.timesteps[0] == 19 and grid.timesteps[-1] == 999 and grid.k == 20
    t_nk, t_n = grid.pair(torch.arange(50))
    assert t_n[0] == 0  # τ_0 − k = −1 clamps to 0
    assert ((t_nk - t_n)[1:] == 20).all()


def test_grid_rejects_non_divisor():
    with pytest.raises(ValueError, match="must divide"):
        SolverGrid(1000, 30)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_inference_grid_equals_lcmscheduler(steps):
    sched = LCMScheduler(original_inference_steps=50)
    sched.set_timesteps(steps)
    assert lcm_inference_timesteps(steps, 50) == sched.timesteps.tolist()
    # Every sampling timestep is a training-grid point: training and sampling agree by construction.
    assert set(sched.timesteps.tolist()) <= set(SolverGrid(1000, 50).timesteps.tolist())


def test_add_noise_matches_diffusers():
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    ours = NoiseSchedule(scaled_linear_alphas_cumprod()).add_noise(x0, eps, t)
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).add_noise(x0, eps, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
