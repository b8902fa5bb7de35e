"""Classifier-free guidance in the LCM convention, and its one conversion to diffusers' guidance_scale.

Convention (LCM paper arXiv:2310.04378 eq. 9): ε̂ = ε_c + w (ε_c − ε_u), so w = 0 is the plain conditional model.
diffusers pipelines use ε̂ = ε_u + g (ε_c − ε_u) with g = guidance_scale, i.e. g = w + 1, and LCM UNets with a
guidance embedding embed g − 1 = w. Convert only through `guidance_scale_from_w` / `w_from_guidance_scale`.
"""

from __future__ import annotations

import torch

from .parameterization import append_dims


def sample_w(batch: int, w_min: float, w_max: float, generator: torch.Generator | None = None, device=None):
    """w ~ U[w_min, w_max], one per sample."""
    u = torch.rand(batch, generator=generator, device=device)
    return w_min + (w_max - w_min) * u


def cfg(pred_cond, pred_uncond, w):
    """ε̂ = ε_c + w (ε_c − ε_u), w broadcast per sample (LCM eq. 9)."""
    if torch.is_tensor(w):
        w = append_dims(w, pred_cond.ndim).to(pred_cond.dtype)
    return pred_cond + w * (pred_cond - pred_uncond)


def guidance_scale_from_w(w):
    """diffusers guidance_scale g = w + 1 (the trap: our w = 0 is their g = 1, i.e. no guidance)."""
    return w + 1.0


def w_from_guidance_scale(guidance_scale):
    """w = g − 1."""
    return guidance_scale - 1.0


def w_embedding(w: torch.Tensor, dim: int = 256, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of w·1000 (VDM arXiv:2107.00630 App. B), as the diffusers LCM pipelines embed g − 1 = w."""
    w = w.reshape(-1).to(torch.float32) * 1000.0
    half = dim // 2
    # Same operation order as the pipeline's embedding: the arguments reach ~1e4, so rounding order matters.
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -step.to(w.device))
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)
