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


def test_top_index_share_zero_draws_exactly_the_uniform_indices():
    uniform = torch.randint(0, 25, (64,), generator=torch.Generator().manual_seed(3))
    drawn = SolverGrid(1000, 25, top_share=0.0).sample_index(64, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, uniform)
    assert SolverGrid(1000, 25).top_share == 0.0  # the default


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_top_index_share_histogram_matches_its_law(share):
    n, N = 200_000, 25
    idx = SolverGrid(1000, N, top_share=share).sample_index(n, torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=N).double() / n
    want = torch.full((N,), (1 - share) / N, dtype=torch.float64)
    want[-1] += share  # P(top) = share + (1 − share)/N
    # each bin's binomial standard error is ≤ 0.0012 here; 5 of them
    torch.testing.assert_close(freq, want, atol=5 * (0.25 / n) ** 0.5, rtol=0)
    assert SolverGrid(1000, N, top_share=share).pair(freq.argmax().view(1))[0].item() == 999


def test_top_index_share_rejects_one():
    with pytest.raises(ValueError, match="top_share"):
        SolverGrid(1000, 25, top_share=1.0)


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
