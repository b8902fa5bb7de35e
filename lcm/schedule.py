"""Noise schedule and the skipping-step grid (DESIGN.md §1).

Index convention, fixed once for the whole package: a training pair is (t_{n+k}, t_n) where t_{n+k} = τ_i is a point of the
teacher's N-step grid τ_i = (i+1)·k − 1 (k = T/N) and t_n = τ_i − k, clamped at 0. The student is evaluated at t_{n+k};
the teacher's ODE step goes t_{n+k} → t_n; the target is evaluated at t_n. This grid is the one diffusers' LCMScheduler
uses with `original_inference_steps = N`, so training and sampling agree by construction.
"""

from __future__ import annotations

import torch

from .constants import NUM_DDIM_TIMESTEPS
from .parameterization import append_dims


def scaled_linear_alphas_cumprod(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t of SD/SDXL: betas linear in √β (DDPM, Ho et al. 2020, with SD's "scaled_linear" betas)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def linear_alphas_cumprod(T: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t for a linear beta schedule (DDPM; PixArt uses 0.0001–0.02)."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


BETA_SCHEDULES = {"scaled_linear": scaled_linear_alphas_cumprod, "linear": linear_alphas_cumprod}


def alphas_cumprod_from_config(beta_schedule: str, T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """ᾱ from a diffusers-style scheduler config; unknown schedules are an error listing the valid ones."""
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {sorted(BETA_SCHEDULES)}")
    return BETA_SCHEDULES[beta_schedule](T, beta_start, beta_end)


class NoiseSchedule:
    """α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), looked up at integer timesteps; kept in float64, returned in float32."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.T = len(alphas_cumprod)

    def alpha_sigma(self, t: torch.Tensor, ndim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) at integer timesteps t, shaped (B, 1, …, 1) to broadcast against a tensor of `ndim` dims."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        return append_dims(alpha.float(), ndim), append_dims(sigma.float(), ndim)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = α_t x₀ + σ_t ε (forward process, DDPM eq. 4)."""
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return alpha.to(x0.dtype) * x0 + sigma.to(x0.dtype) * noise


class SolverGrid:
    """The teacher's N-step skipping grid τ_i = (i+1)·k − 1, k = T/N (LCM, Luo et al. 2023, arXiv:2310.04378 §4.2)."""

    def __init__(self, T: int = 1000, num_ddim_timesteps: int = NUM_DDIM_TIMESTEPS, top_share: float = 0.0):
        if T % num_ddim_timesteps:
            raise ValueError(f"num_ddim_timesteps={num_ddim_timesteps} must divide T={T}")
        if not 0 <= top_share < 1:
            raise ValueError(f"top_share={top_share} must be in [0, 1)")
        self.T, self.N = T, num_ddim_timesteps
        # the extra probability of the top pair (t_{n+k} = T − 1, where every sampler's first step, and a 1-step
        # sampler's only one, queries the student): P(N − 1) = top_share + (1 − top_share)/N
        self.top_share = top_share
        self.k = T // num_ddim_timesteps
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.k - 1  # ascending: 19, 39, …, 999

    def pair(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_{n+k}, t_n) for grid indices: τ_i and τ_i − k, the latter clamped to 0 (τ_0 − k < 0)."""
        t_nk = self.timesteps.to(index.device)[index]
        return t_nk, (t_nk - self.k).clamp(min=0)

    def sample_index(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Grid indices i ~ U{0, …, N−1}, one per sample; with `top_share` > 0, each index is the top one N − 1 with
        probability top_share and uniform otherwise (the index draw, then one uniform draw). top_share = 0 draws
        exactly what it always did: the same generator calls, so the same indices."""
        index = torch.randint(0, self.N, (batch,), generator=generator, device=device)
        if self.top_share > 0:
            top = torch.rand((batch,), generator=generator, device=device) < self.top_share
            index = torch.where(top, torch.full_like(index, self.N - 1), index)
        return index


def lcm_inference_timesteps(num_steps: int, original_steps: int = NUM_DDIM_TIMESTEPS, T: int = 1000) -> list[int]:
    """The timesteps LCMScheduler samples at: num_steps points evenly taken from the training grid, descending from τ_{N−1}.

    Mirrors LCMScheduler.set_timesteps (strength 1): the descending training grid is subsampled by
    floor(arange(num_steps) · N / num_steps), so 1 step is t = 999 and more steps add points toward 0.
    """
    if not 1 <= num_steps <= original_steps:
        raise ValueError(f"num_steps must be in [1, {original_steps}], got {num_steps}")
    descending = SolverGrid(T, original_steps).timesteps.flip(0)
    picks = torch.floor(torch.arange(num_steps, dtype=torch.float64) * original_steps / num_steps).long()
    return descending[picks].tolist()
