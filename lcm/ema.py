"""Exponential moving average of parameters: θ⁻ ← μ θ⁻ + (1 − μ) θ (LCM arXiv:2310.04378 Alg. 1)."""

from __future__ import annotations

from typing import Iterable

import torch


@torch.no_grad()
def ema_update_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], mu: float) -> None:
    """In place: target ← μ·target + (1 − μ)·online. μ = 0 copies, μ = 1 keeps the target as it is."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"EMA decay mu must be in [0, 1], got {mu}")
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"EMA needs matching tensors: {len(target)} target vs {len(online)} online")
    for t, o in zip(target, online):
        # lerp_(o, w) computes t + w (o − t) = (1 − w) t + w o, so weight = 1 − μ.
        t.lerp_(o.to(t.dtype), 1.0 - mu)
