"""The EMA target θ⁻ ← μ θ⁻ + (1 − μ) θ (LCM arXiv:2310.04378 Alg. 1): the update, the shadow tensors, and the weight
swap that evaluates a module with θ⁻ in place of θ. lcm/roles.py turns that swap into the target role callable."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

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


@contextlib.contextmanager
def swapped_weights(params: list[torch.nn.Parameter], replacement: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily point `params` at `replacement` values (e.g. EMA adapters for the target), restoring after.

    Important: the swap rebinds `p.data` instead of copying into `p`. The student's forward has already saved these
    parameters for its backward pass; an in-place copy would bump their version counters and make that backward fail
    ("modified by an inplace operation"). Rebinding leaves the saved tensors untouched, and the originals are back
    before any backward runs.

    Important too: inside one autocast region torch caches the bf16/fp16 copy of every trainable leaf parameter, keyed
    by the parameter itself, and rebinding `.data` keeps the key. Without clearing that cache on the way in and out, a
    target evaluated after the student's forward (the training step under `accelerator.autocast()`) would silently
    run on the student's own weights, and whatever followed the swap on θ⁻'s (tests/test_ema.py).
    """
    saved = [p.data for p in params]
    torch.clear_autocast_cache()
    for p, r in zip(params, replacement):
        p.data = r.detach().to(device=p.device, dtype=p.dtype)
    try:
        yield
    finally:
        torch.clear_autocast_cache()
        for p, s in zip(params, saved):
            p.data = s


class EMATarget:
    """θ⁻ as shadow tensors of the trainable parameters: the target runs on the student's module with θ⁻ swapped in.

    Works for LoRA adapters (a few MB) and whole UNets alike; `device="cpu"` keeps the shadow off the accelerator at
    the cost of a copy in and out per target evaluation.
    """

    def __init__(self, named_params: dict, decay: float, device=None):
        self.names, self.params, self.decay = list(named_params), list(named_params.values()), decay
        self.shadow = [p.detach().to(device or p.device, copy=True) for p in self.params]

    def update(self) -> None:
        """θ⁻ ← μ θ⁻ + (1 − μ) θ, after each optimiser step."""
        ema_update_(self.shadow, [p.detach().to(s.device) for p, s in zip(self.params, self.shadow)], self.decay)

    def state(self) -> dict:
        """Shadow tensors keyed by parameter name, so a checkpoint never depends on parameter order."""
        return {f"ema.{n}": t for n, t in zip(self.names, self.shadow)}

    def load(self, state: dict) -> None:
        for n, t in zip(self.names, self.shadow):
            t.copy_(state[f"ema.{n}"])

    def swapped_in(self):
        """Context manager: the tracked parameters hold θ⁻ inside it and θ again after (`swapped_weights`)."""
        return swapped_weights(self.params, self.shadow)

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.Tensor]) -> None:
        """Copy θ⁻ into `params` for good (in place, cast to each tensor's dtype and device): the model to export.
        `params` are matched to the shadow in order: the tracked parameters' order."""
        params = list(params)
        if len(params) != len(self.shadow):
            raise ValueError(f"copy_to needs {len(self.shadow)} tensors (one per shadow tensor), got {len(params)}")
        for p, s in zip(params, self.shadow):
            p.copy_(s)
