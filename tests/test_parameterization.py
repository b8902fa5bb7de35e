import pytest
import torch
from diffusers import LCMScheduler

from lcm.parameterization import (
    boundary_scalings,
    eps_from_v,
    to_x0_eps,
    v_from_x0_eps,
    x0_from_v,
)
from lcm.schedule import NoiseSchedule, scaled_linear_alphas_cumprod

SCHED = NoiseSchedule(scaled_linear_alphas_cumprod())


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    t = torch.tensor([1, 250, 600, 999])
    alpha, sigma = SCHED.alpha_sigma(t, 4)
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_round_trip_recovers_x0_and_eps(prediction_type):
    x0, eps, alpha, sigma, z = _state()
    pred = {"epsilon": eps, "v_prediction": v_from_x0_eps(x0, eps, alpha, sigma), "sample": x0}[prediction_type]
    x0_hat, eps_hat = to_x0_eps(pred, z, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4)


def test_v_round_trip():
    x0, eps, alpha, sigma, z = _state(1)
    v = v_from_x0_eps(x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_v(z, v, alpha, sigma), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_from_v(z, v, alpha, sigma), eps, atol=1e-5, rtol=1e-5)


def test_unknown_prediction_type_names_valid_ones():
    x0, eps, alpha, sigma, z = _state()
    with pytest.raises(ValueError, match="v_prediction"):
        to_x0_eps(eps, z, alpha, sigma, "flow")


def test_boundary_condition_at_zero():
    c_skip, c_out = boundary_scalings(torch.tensor([0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


@pytest.mark.parametrize("t", [0, 1, 19, 259, 999])
def test_scalings_equal_lcmscheduler(t):
    ours = boundary_scalings(torch.tensor([t]), sigma_data=0.5, timestep_scaling=10.0)
    theirs = LCMScheduler(timestep_scaling=10.0).get_scalings_for_boundary_condition_discrete(t)
    assert ours[0].item() == pytest.approx(theirs[0], rel=1e-6, abs=1e-9)
    assert ours[1].item() == pytest.approx(theirs[1], rel=1e-6)
