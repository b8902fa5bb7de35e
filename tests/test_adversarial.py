"""Adversarial losses against their closed forms, R1 on a quadratic discriminator, and the t̂ histogram against its
density (lcm/adversarial.py)."""

import math

import pytest
import torch

from lcm import adversarial as adv


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
