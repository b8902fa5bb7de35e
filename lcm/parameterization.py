"""Prediction-type conversions (ε ↔ x̂₀ ↔ v), the consistency boundary scalings, and `append_dims`.

With z_t = α_t x₀ + σ_t ε and α² + σ² = 1: v = α_t ε − σ_t x₀ (Salimans & Ho 2022, arXiv:2202.00512 §4).
"""

from __future__ import annotations

import torch

from .constants import SIGMA_DATA, TIMESTEP_SCALING

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-sample tensor (B,) viewed as (B, 1, …, 1) with `ndim` dims, to broadcast against a batch of latents."""
    return x.reshape((-1,) + (1,) * (ndim - 1))


def x0_from_eps(z, eps, alpha, sigma):
    """x̂₀ = (z − σ ε) / α."""
    return (z - sigma * eps) / alpha


def eps_from_x0(z, x0, alpha, sigma):
    """ε = (z − α x₀) / σ."""
    return (z - alpha * x0) / sigma


def v_from_x0_eps(x0, eps, alpha, sigma):
    """v = α ε − σ x₀."""
    return alpha * eps - sigma * x0


def x0_from_v(z, v, alpha, sigma):
    """x̂₀ = α z − σ v (uses α² + σ² = 1)."""
    return alpha * z - sigma * v


def eps_from_v(z, v, alpha, sigma):
    """ε = σ z + α v (uses α² + σ² = 1)."""
    return sigma * z + alpha * v


def to_x0_eps(pred, z, alpha, sigma, prediction_type: str):
    """The one conversion from a network output of any prediction type to (x̂₀, ε̂)."""
    if prediction_type == "epsilon":
        return x0_from_eps(z, pred, alpha, sigma), pred
    if prediction_type == "v_prediction":
        return x0_from_v(z, pred, alpha, sigma), eps_from_v(z, pred, alpha, sigma)
    if prediction_type == "sample":
        return pred, eps_from_x0(z, pred, alpha, sigma)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {list(PREDICTION_TYPES)}")


def boundary_scalings(t, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING):
    """(c_skip, c_out) with c_skip(0) = 1, c_out(0) = 0 (LCM arXiv:2310.04378 eq. 4 / Song et al. 2023 App. C).

    c_skip = σ_d² / ((s·t)² + σ_d²), c_out = s·t / √((s·t)² + σ_d²). The discrete timestep t is scaled by
    s = timestep_scaling (10 in LCM-LoRA and diffusers' LCMScheduler) so the boundary behaviour is sharp near t = 0;
    with s = 1 the skip term dominates almost to t = 1000 and the student barely learns — a classic trap.
    """
    st = timestep_scaling * t.double() if torch.is_tensor(t) else timestep_scaling * float(t)
    denom = st**2 + sigma_data**2
    c_skip = sigma_data**2 / denom
    c_out = st / (denom**0.5)
    if torch.is_tensor(t):
        return c_skip.float(), c_out.float()
    return c_skip, c_out
