"""Adversarial losses for distillation: the discriminator's and the generator's terms, the R1 penalty, and the
distribution of the re-noising timestep t̂ at which the discriminator judges a sample.

The discriminator is a callable `D(z_t̂, t̂, cond) -> logits (B, L)`: one logit per sample and feature level L (the
teacher-feature heads of lcm/discriminator.py, or a toy MLP). Every loss here returns one value per sample, averaged
over the levels; the trainer reduces, weights and steps. Pure torch.

Conventions: a logit > 0 means "real". Losses follow the GAN literature's names:
- hinge (Lim & Ye 2017, arXiv:1705.02894; used by ADD, arXiv:2311.17042 §3.2):
      L_D = relu(1 − D(x)) + relu(1 + D(x̂)),   L_G = −D(x̂)
- non-saturating (Goodfellow et al. 2014, arXiv:1406.2661 §3):
      L_D = softplus(−D(x)) + softplus(D(x̂)),  L_G = softplus(−D(x̂))
- R1 (Mescheder et al. 2018, arXiv:1801.04406 eq. 9): γ/2 · ‖∇_x D(x)‖² on real inputs.
t̂ follows LADD (Sauer et al. 2024, arXiv:2403.12015 §3.2): a logit-normal u = sigmoid(m + s·n), n ~ N(0, 1), here with an
optional SD3-style shift u' = a·u / (1 + (a − 1)·u) that moves mass towards high noise for a > 1; the timestep is
round(u'·(T − 1)).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F


def hinge_d_loss(real_logits, fake_logits):
    """Per-sample relu(1 − D(x)) + relu(1 + D(x̂)), averaged over feature levels."""
    return (F.relu(1.0 - real_logits) + F.relu(1.0 + fake_logits)).flatten(1).mean(1)


def hinge_g_loss(fake_logits):
    """Per-sample −D(x̂), averaged over feature levels."""
    return (-fake_logits).flatten(1).mean(1)


def nonsaturating_d_loss(real_logits, fake_logits):
    """Per-sample −log σ(D(x)) − log(1 − σ(D(x̂))) = softplus(−D(x)) + softplus(D(x̂))."""
    return (F.softplus(-real_logits) + F.softplus(fake_logits)).flatten(1).mean(1)


def nonsaturating_g_loss(fake_logits):
    """Per-sample −log σ(D(x̂)) = softplus(−D(x̂)) (the generator maximises log D instead of minimising log(1 − D))."""
    return F.softplus(-fake_logits).flatten(1).mean(1)


D_LOSSES: dict[str, Callable] = {"hinge": hinge_d_loss, "nonsaturating": nonsaturating_d_loss}
G_LOSSES: dict[str, Callable] = {"hinge": hinge_g_loss, "nonsaturating": nonsaturating_g_loss}


def r1_penalty(logits, inputs, create_graph: bool = True):
    """Per-sample ‖∇_x Σ_levels D(x)‖² at the real inputs x (R1 without its γ/2). `inputs` must require grad and
    `logits` must be computed from them; `create_graph` keeps the penalty differentiable for the D step."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=create_graph)
    return grad.pow(2).flatten(1).sum(1)


def shift_unit_time(u, shift: float):
    """u' = a·u / (1 + (a − 1)·u): monotone on [0, 1], fixes 0 and 1; a > 1 moves mass towards u' = 1 (high noise)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def logit_normal_cdf(u, loc: float, scale: float, shift: float = 1.0):
    """P(U' ≤ u) for U' = shift(sigmoid(loc + scale·n)): Φ((logit(u₀) − loc)/scale) with u₀ the unshifted time."""
    u = torch.as_tensor(u, dtype=torch.float64)
    u0 = u / (shift - (shift - 1.0) * u)  # the inverse of shift_unit_time
    z = (torch.logit(u0) - loc) / scale
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def sample_unit_time(n: int, generators: list[torch.Generator] | None, loc: float = 1.0, scale: float = 1.0,
                     shift: float = 1.0, generator: torch.Generator | None = None):
    """n draws of U' ∈ (0, 1) from the shifted logit-normal; one draw per sample's generator when `generators` is
    given (a sample's draw then does not depend on its batch), else n draws from `generator`."""
    if generators is not None:
        if len(generators) != n:
            raise ValueError(f"{len(generators)} generators for {n} draws: need one per sample")
        normal = torch.cat([torch.randn(1, generator=g, device=g.device).cpu() for g in generators])
    else:
        normal = torch.randn(n, generator=generator)
    return shift_unit_time(torch.sigmoid(loc + scale * normal), shift)


def sample_t_hat(n: int, generators, T: int = 1000, loc: float = 1.0, scale: float = 1.0, shift: float = 1.0,
                 device=None):
    """Integer re-noising timesteps t̂ = round(U'·(T − 1)) ∈ {0, …, T − 1}, U' from `sample_unit_time`."""
    u = sample_unit_time(n, generators, loc, scale, shift)
    return (u * (T - 1)).round().long().to(device)


def sample_t_hat_above(start: torch.Tensor, generators, T: int = 1000, loc: float = 1.0, scale: float = 1.0,
                       shift: float = 1.0, device=None):
    """Re-noising timesteps t̂ ≥ start per row: t̂ = round(start + U'·(T − 1 − start)), the same U' draw as
    `sample_t_hat`, which this is exactly where start = 0 (a phase-edge sample at s is judged at a t̂ it can reach)."""
    u = sample_unit_time(len(start), generators, loc, scale, shift)
    start = start.to(u.device, u.dtype)
    return (start + u * (T - 1 - start)).round().long().to(device)


def forward_from(x, noise, s, t, schedule):
    """z_t from a sample x at timestep s ≤ t, per row, through the forward process's transition q(z_t | z_s) =
    N((α_t/α_s)·z_s, (1 − ᾱ_t/ᾱ_s)·I) (DDPM, Ho et al. 2020, eq. 2 composed): a z_s on the marginal at s lands on the
    marginal at t. Rows with s = −1 (the clean end) are `schedule.add_noise` exactly; s = t returns x."""
    alpha_t, sigma_t = schedule.alpha_sigma(t, x.ndim)
    alpha_s, _ = schedule.alpha_sigma(s.clamp(min=0), x.ndim)
    clean = (s < 0).view(-1, *([1] * (x.ndim - 1))).to(alpha_t.device)
    ratio = torch.where(clean, alpha_t, alpha_t / alpha_s)
    std = torch.where(clean, sigma_t, (1.0 - ratio.pow(2)).clamp(min=0).sqrt())
    return ratio.to(x.dtype) * x + std.to(x.dtype) * noise


def time_features(t, T: int = 1000, freqs: int = 16) -> torch.Tensor:
    """sin/cos of t/T at octave frequencies 2^i·π, i < freqs: (B, 2·freqs), the discriminators' t̂ input."""
    u = t.float()[:, None] / T
    k = 2.0 ** torch.arange(freqs, dtype=torch.float32, device=t.device) * math.pi
    return torch.cat([torch.sin(k * u), torch.cos(k * u)], dim=1)


def renoise(x0, noise, t, schedule):
    """z_t̂ = α_t̂ x̂₀ + σ_t̂ ε: what the discriminator sees (ADD §3.2, LADD §3.1); x̂₀ keeps its graph."""
    return schedule.add_noise(x0, noise, t)


def warmed_up_weight(weight: float, warmup_steps: int, step: int) -> float:
    """The adversarial weight at optimiser step `step`: linear from 0 to `weight` over `warmup_steps` (0: constant)."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps)


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """The discriminator during the generator step: its parameters take no gradient (the generator's loss still
    differentiates through it to the judged sample), and get back their own requires_grad flags afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
