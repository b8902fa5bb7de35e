"""Adversarial losses against their closed forms, R1 on a quadratic discriminator, and the t̂ histogram against its
density (lcm/adversarial.py)."""

import math

import pytest
import torch

from lcm import adversarial as adv
from lcm.schedule import NoiseSchedule, scaled_linear_alphas_cumprod


def test_hinge_losses_closed_form():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    fake = torch.tensor([[-3.0, 0.25], [0.0, -0.5]])
    # relu(1 − r) + relu(1 + f) per element, then the mean over levels
    d = adv.hinge_d_loss(real, fake)
    expected = torch.tensor([((0 + 0) + (0.5 + 1.25)) / 2, ((2 + 1) + (0 + 0.5)) / 2])
    assert torch.allclose(d, expected)
    assert torch.allclose(adv.hinge_g_loss(fake), torch.tensor([(3.0 - 0.25) / 2, (0.0 + 0.5) / 2]))


def test_nonsaturating_losses_closed_form():
    real, fake = torch.tensor([[0.3]]), torch.tensor([[-1.2]])
    sig = torch.sigmoid
    d = adv.nonsaturating_d_loss(real, fake)
    assert torch.allclose(d, -torch.log(sig(real)) - torch.log(1 - sig(fake)).view(1), atol=1e-6)
    assert torch.allclose(adv.nonsaturating_g_loss(fake), -torch.log(sig(fake)).view(1), atol=1e-6)


def test_losses_optimal_discriminator_signs():
    """A perfect discriminator (real ≫ 0, fake ≪ 0) has zero hinge D loss and a large generator loss."""
    real, fake = torch.full((4, 3), 5.0), torch.full((4, 3), -5.0)
    assert torch.equal(adv.hinge_d_loss(real, fake), torch.zeros(4))
    assert (adv.hinge_g_loss(fake) == 5.0).all()
    assert (adv.nonsaturating_d_loss(real, fake) < 0.014).all()


def test_r1_on_quadratic_discriminator():
    """D(x) = ½ xᵀAx has ∇D = Ax, so the penalty is ‖Ax‖² per sample."""
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    logits = 0.5 * torch.einsum("bi,ij,bj->b", x, A, x)[:, None]
    pen = adv.r1_penalty(logits, x)
    assert torch.allclose(pen, (x.detach() @ A.T).pow(2).sum(1), atol=1e-6)
    # create_graph keeps it differentiable: d/dx ‖Ax‖² = 2AᵀAx
    (g,) = torch.autograd.grad(pen.sum(), x)
    assert torch.allclose(g, 2 * x.detach() @ (A.T @ A).T, atol=1e-5)


@pytest.mark.parametrize("loc,scale,shift", [(1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (-0.5, 0.7, 3.0)])
def test_t_hat_histogram_matches_density(loc, scale, shift):
    """20 bins of 200k draws against the CDF's bin masses: every bin within 5 standard errors."""
    n = 200_000
    u = adv.sample_unit_time(n, None, loc, scale, shift, generator=torch.Generator().manual_seed(1))
    assert ((u > 0) & (u < 1)).all()
    edges = torch.linspace(0, 1, 21, dtype=torch.float64)
    cdf = adv.logit_normal_cdf(edges.clamp(1e-12, 1 - 1e-12), loc, scale, shift)
    p = cdf[1:] - cdf[:-1]
    counts = torch.histc(u.double(), bins=20, min=0, max=1)
    se = (n * p * (1 - p)).sqrt().clamp_min(1.0)
    assert ((counts - n * p).abs() <= 5 * se).all(), (counts, n * p)


def test_t_hat_shift_moves_mass_to_high_noise():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = adv.sample_unit_time(10_000, None, 0.0, 1.0, 1.0, generator=g())
    shifted = adv.sample_unit_time(10_000, None, 0.0, 1.0, 3.0, generator=g())
    assert (shifted >= plain).all() and shifted.mean() > plain.mean() + 0.1
    assert adv.shift_unit_time(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]


def test_t_hat_per_sample_generators_do_not_depend_on_batch():
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = adv.sample_t_hat(2, gens([5, 6]))
    assert both[1] == adv.sample_t_hat(1, gens([6]))[0]
    assert both.dtype == torch.long and 0 <= both.min() and both.max() <= 999
    with pytest.raises(ValueError, match="one per sample"):
        adv.sample_t_hat(3, gens([5, 6]))


def test_warmed_up_weight():
    assert adv.warmed_up_weight(0.5, 0, 0) == 0.5
    assert adv.warmed_up_weight(0.5, 100, 0) == 0.0
    assert math.isclose(adv.warmed_up_weight(0.5, 100, 25), 0.125)
    assert adv.warmed_up_weight(0.5, 100, 400) == 0.5


def _linear_map(fn, n_inputs, shape):
    """The coefficients of a map that is linear in its inputs, read off by feeding unit inputs one at a time."""
    coeffs = []
    for i in range(n_inputs):
        args = [torch.zeros(shape) for _ in range(n_inputs)]
        args[i] = torch.ones(shape)
        coeffs.append(fn(*args))
    return coeffs


def test_forward_from_composes_to_the_marginal():
    """z_s = α_s x₀ + σ_s ε₁ carried to t by `forward_from` with ε₂ is α_t x₀ + c₁ε₁ + c₂ε₂ with c₁² + c₂² = σ_t²:
    the marginal at t, for every s ≤ t (DDPM's q(z_t | z_s) composed with q(z_s | x₀))."""
    schedule = NoiseSchedule(scaled_linear_alphas_cumprod())
    s = torch.tensor([0, 100, 499, 749, 998])
    t = torch.tensor([5, 700, 499, 999, 999])

    def composed(x0, e1, e2):
        return adv.forward_from(schedule.add_noise(x0, e1, s), e2, s, t, schedule)

    a, c1, c2 = _linear_map(composed, 3, (5, 2))
    alpha_t, sigma_t = schedule.alpha_sigma(t, 2)
    torch.testing.assert_close(a, alpha_t.expand(5, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c1.pow(2) + c2.pow(2), sigma_t.pow(2).expand(5, 2), rtol=1e-5, atol=1e-6)
    assert torch.all(c2[2] == 0)  # s = t: nothing added


def test_forward_from_clean_end_is_add_noise_and_s_equal_t_is_identity():
    schedule = NoiseSchedule(scaled_linear_alphas_cumprod())
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    clean = torch.full_like(t, -1)
    assert torch.equal(adv.forward_from(x, noise, clean, t, schedule), schedule.add_noise(x, noise, t))
    assert torch.equal(adv.forward_from(x, noise, t, t, schedule), x)
    mixed = torch.tensor([-1, 10, -1, 999])  # rows are independent
    out = adv.forward_from(x, noise, mixed, t, schedule)
    assert torch.equal(out[[0, 2]], schedule.add_noise(x, noise, t)[[0, 2]]) and torch.equal(out[[1, 3]], x[[1, 3]])


def test_t_hat_above_start_zero_is_sample_t_hat_and_stays_in_range():
    gens = lambda: [torch.Generator().manual_seed(20 + i) for i in range(64)]  # noqa: E731
    assert torch.equal(adv.sample_t_hat_above(torch.zeros(64, dtype=torch.long), gens(), 1000, 0.5, 1.2, 2.0),
                       adv.sample_t_hat(64, gens(), 1000, 0.5, 1.2, 2.0))
    start = torch.arange(64) * 15
    t_hat = adv.sample_t_hat_above(start, gens(), 1000)
    assert torch.all(t_hat >= start) and torch.all(t_hat <= 999)
    assert torch.equal(adv.sample_t_hat_above(torch.full((64,), 999), gens(), 1000), torch.full((64,), 999))
