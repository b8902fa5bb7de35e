"""Teacher ODE solvers: one augmented PF-ODE step z_{t_{n+k}} → ẑ_{t_n} (LCM arXiv:2310.04378 eq. 8, Ψ).

A solver takes `denoise(z, t) -> (x̂₀, ε̂)` — the teacher with classifier-free guidance already applied — the current
latent, the two timesteps and the NoiseSchedule. Solvers that evaluate the teacher more than once call `denoise`
more than once; each call is itself one batched cond+uncond teacher pass.
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def ddim_step(x0_hat, eps_hat, alpha_s, sigma_s):
    """ẑ_s = α_s x̂₀ + σ_s ε̂ (DDIM, Song et al. 2021, arXiv:2010.02502 eq. 12 with η = 0)."""
    return alpha_s * x0_hat + sigma_s * eps_hat


def ddim_solver(denoise: Denoiser, z_t, t, s, schedule: NoiseSchedule):
    """First-order DDIM step from t to s (one teacher evaluation)."""
    x0_hat, eps_hat = denoise(z_t, t)
    alpha_s, sigma_s = schedule.alpha_sigma(s, z_t.ndim)
    return ddim_step(x0_hat, eps_hat, alpha_s.to(z_t.dtype), sigma_s.to(z_t.dtype))


SOLVERS: dict[str, Callable] = {"ddim": ddim_solver}


def get_solver(name: str):
    """Look a solver up by name; an unknown name lists the valid ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid: {sorted(SOLVERS)}")
    return SOLVERS[name]
