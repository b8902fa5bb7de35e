"""Teacher ODE solvers: one augmented PF-ODE step z_{t_{n+k}} → ẑ_{t_n} (LCM arXiv:2310.04378 eq. 8, Ψ).

A solver takes `denoise(z, t) -> (x̂₀, ε̂)` — the teacher with classifier-free guidance already applied — the current
latent, the two timesteps and the NoiseSchedule. Solvers that evaluate the teacher more than once call `denoise`
more than once; each call is itself one batched cond+uncond teacher pass.

Interface: `solver(denoise, z_t, t, s, schedule) -> z_s` with integer timestep tensors t, s of shape (B,), t > s ≥ 0
(t == s is accepted and returns z_t). `denoise` is only ever called with integer timesteps from the discrete DDPM
schedule, because a real UNet is trained on those. Arithmetic runs in at least float32 whatever the latent dtype; the
teacher sees latents in the latent dtype and the result is cast back to it.

Notation: α_t, σ_t of the VP process z_t = α_t x₀ + σ_t ε; Karras' σ^K_t = σ_t/α_t and scaled latent x = z/α
(EDM, arXiv:2206.00364 Table 1, VP column); half log-SNR λ_t = log(α_t/σ_t) (DPM-Solver, arXiv:2206.00927).
"""

from __future__ import annotations

from typing import Callable

import torch

from .parameterization import append_dims
from .schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _work_dtype(z: torch.Tensor) -> torch.dtype:
    """Solver arithmetic in float32 at least (fp16/bf16 latents would lose the small step differences)."""
    return torch.promote_types(z.dtype, torch.float32)


def _alpha_sigma(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor):
    """(α_t, σ_t) broadcast against `like` and in its dtype."""
    alpha, sigma = schedule.alpha_sigma(t, like.ndim)
    return alpha.to(like.dtype), sigma.to(like.dtype)


# ---------------------------------------------------------------------------------------------------------------- DDIM


def ddim_step(x0_hat, eps_hat, alpha_s, sigma_s):
    """ẑ_s = α_s x̂₀ + σ_s ε̂ (DDIM, Song et al. 2021, arXiv:2010.02502 eq. 12 with η = 0)."""
    return alpha_s * x0_hat + sigma_s * eps_hat


def ddim_solver(denoise: Denoiser, z_t, t, s, schedule: NoiseSchedule):
    """First-order DDIM step from t to s (one teacher evaluation)."""
    x0_hat, eps_hat = denoise(z_t, t)
    alpha_s, sigma_s = schedule.alpha_sigma(s, z_t.ndim)
    return ddim_step(x0_hat, eps_hat, alpha_s.to(z_t.dtype), sigma_s.to(z_t.dtype))


# ------------------------------------------------------------------------------------------ Euler / Heun (Karras EDM)


def karras_sigma(alpha, sigma):
    """σ^K = σ_t / α_t: the VP process as x = z/α = x₀ + σ^K ε (Karras et al. 2022, arXiv:2206.00364 Table 1, VP)."""
    return sigma / alpha


def karras_derivative(x, x0_hat, sigma_k):
    """d = dx/dσ^K = (x − D(x; σ^K)) / σ^K with D = x̂₀ (Karras et al. 2022, arXiv:2206.00364 eq. 3 / Alg. 1)."""
    return (x - x0_hat) / sigma_k


def euler_step(x, d, sigma_k_t, sigma_k_s):
    """x_s = x_t + (σ^K_s − σ^K_t) d_t (Karras et al. 2022, arXiv:2206.00364 Alg. 1, Euler predictor)."""
    return x + (sigma_k_s - sigma_k_t) * d


def heun_step(x, d_t, d_s, sigma_k_t, sigma_k_s):
    """x_s = x_t + (σ^K_s − σ^K_t)(½ d_t + ½ d'_s) (Karras et al. 2022, arXiv:2206.00364 Alg. 1, corrector)."""
    return x + (sigma_k_s - sigma_k_t) * (0.5 * d_t + 0.5 * d_s)


def _karras_first_slope(denoise: Denoiser, z_t, t, s, schedule: NoiseSchedule):
    """Shared start of Euler and Heun: x_t = z_t/α_t, σ^K at t and s, and the teacher's slope d_t at (z_t, t)."""
    work = _work_dtype(z_t)
    z = z_t.to(work)
    alpha_t, sigma_t = _alpha_sigma(schedule, t, z)
    alpha_s, sigma_s = _alpha_sigma(schedule, s, z)
    sk_t, sk_s = karras_sigma(alpha_t, sigma_t), karras_sigma(alpha_s, sigma_s)
    x_t = z / alpha_t
    x0_hat, _ = denoise(z_t, t)
    return x_t, karras_derivative(x_t, x0_hat.to(work), sk_t), alpha_s, sk_t, sk_s


def euler_solver(denoise: Denoiser, z_t, t, s, schedule: NoiseSchedule):
    """First-order Euler step in Karras' (x = z/α, σ^K = σ/α) coordinates from t to s (one teacher evaluation).

    For a consistent (x̂₀, ε̂) pair d = ε̂, so this is DDIM written in EDM's variables (Karras et al. §3 make the same
    remark); it is kept as its own entry because it follows the EDM derivative form, which is what diffusers'
    EulerDiscreteScheduler implements (its `sample` is our x), and differs from `ddim` only by rounding.
    """
    x_t, d_t, alpha_s, sk_t, sk_s = _karras_first_slope(denoise, z_t, t, s, schedule)
    return (alpha_s * euler_step(x_t, d_t, sk_t, sk_s)).to(z_t.dtype)


def heun_solver(denoise: Denoiser, z_t, t, s, schedule: NoiseSchedule):
    """Second-order Heun step from t to s in Karras' coordinates (two teacher evaluations: at t, then at s).

    The corrector evaluates the teacher at the step's end point, timestep s itself, so no intermediate timestep is
    needed: both evaluations are at the integer timesteps the caller gave. σ^K_s > 0 for every discrete s (σ_0 = √β_0),
    so Alg. 1's special case t_{i+1} = 0 never arises.

    Accuracy: on LCD's k = 20 steps it is 8–30× more accurate than DDIM for a Gaussian oracle, but over one very large
    high-noise step (999 → 499) it is *less* accurate (rel. error 0.26 vs 0.035): there the trajectory is nearly linear
    in σ^K, and z_s is a small difference of large terms that magnifies the corrector's slope error.
    """
    # 1. Euler predictor from the teacher at (z_t, t).
    x_t, d_t, alpha_s, sk_t, sk_s = _karras_first_slope(denoise, z_t, t, s, schedule)
    work = x_t.dtype
    x_pred = euler_step(x_t, d_t, sk_t, sk_s)
    # 2. Second teacher evaluation at the predicted point (z = α_s x), timestep s; average the two slopes.
    x0_pred, _ = denoise((alpha_s * x_pred).to(z_t.dtype), s)
    d_s = karras_derivative(x_pred, x0_pred.to(work), sk_s)
    return (alpha_s * heun_step(x_t, d_t, d_s, sk_t, sk_s)).to(z_t.dtype)


# ------------------------------------------------------------------------------------------------- DPM-Solver++ (2S)


def half_log_snr(alphas_cumprod):
    """λ = log(α/σ) = ½ log(ᾱ / (1 − ᾱ)) (Lu et al. 2022, arXiv:2206.00927 §3.1; DPM-Solver++ arXiv:2211.01095 §2)."""
    return 0.5 * torch.log(alphas_cumprod / (1.0 - alphas_cumprod))


def dpm_solver_pp_first_order(z_t, x0_hat, sigma_t, alpha_s, sigma_s, h):
    """z_s = (σ_s/σ_t) z_t − α_s (e^{−h} − 1) x̂₀, h = λ_s − λ_t (Lu et al. 2022, arXiv:2211.01095 Alg. 1)."""
    return (sigma_s / sigma_t) * z_t - alpha_s * torch.expm1(-h) * x0_hat


def dpm_solver_pp_2s_denoised(x0_t, x0_u, r):
    """D = (1 − 1/(2r)) x̂₀(z_t, t) + 1/(2r) x̂₀(z_u, u); r = ½: Alg. 1's D_i = x̂₀(u_i, s_i) (arXiv:2211.01095)."""
    return (1.0 - 0.5 / r) * x0_t + (0.5 / r) * x0_u


def lambda_midpoint_timestep(schedule: NoiseSchedule, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The integer timestep u ∈ [s, t − 1] whose λ_u is nearest the λ-midpoint (λ_t + λ_s)/2 (Alg. 1's s_i, rounded)."""
    lam = half_log_snr(schedule.alphas_cumprod.to(t.device))  # (T,), float64, decreasing in t
    lam_mid = 0.5 * (lam[t.long()] + lam[s.long()])
    u = (lam[None, :] - lam_mid[:, None]).abs().argmin(dim=1)
    # λ is monotone, so clamping the nearest point into [s, t − 1] keeps it nearest among admissible ones; u < t
    # keeps r > 0, and for t − s = 1 this gives u = s (r = 1). Written min-then-max so t == s yields u = s.
    return torch.maximum(torch.minimum(u, t.long() - 1), s.long()).to(t.dtype)


def dpm_solver_2s_solver(denoise: Denoiser, z_t, t, s, schedule: NoiseSchedule):
    """Second-order single-step DPM-Solver++(2S) from t to s, data-prediction form (two teacher evaluations: t, u).

    Intermediate timestep: Alg. 1 evaluates at s_i = t_λ((λ_t + λ_s)/2), which in general is not an integer timestep.
    We round it to the integer u whose λ is nearest (`lambda_midpoint_timestep`) and then use the r = (λ_u − λ_t)/h
    that u actually has, with D mixing both evaluations as in DPM-Solver-2's free-r₁ form (arXiv:2206.00927) written
    for data prediction. This stays second order for any r ∈ (0, 1] and equals Alg. 1 exactly when r = ½. On the SDXL
    schedule |r − ½| ≤ 0.026 for LCD's k = 20 steps (≤ 0.17 for 2–5-step pairs); a one-step pair has u = s, r = 1.
    """
    work = _work_dtype(z_t)
    z = z_t.to(work)
    u = lambda_midpoint_timestep(schedule, t, s)
    lam = half_log_snr(schedule.alphas_cumprod.to(t.device))
    lam_t, lam_u, lam_s = (append_dims(lam[i.long()], z.ndim) for i in (t, u, s))  # float64 for accurate differences
    h = lam_s - lam_t
    r = torch.where(h != 0, (lam_u - lam_t) / h, torch.ones_like(h))  # t == s: h = 0, the step is the identity
    h, h_u, r = h.to(work), (lam_u - lam_t).to(work), r.to(work)
    _, sigma_t = _alpha_sigma(schedule, t, z)
    alpha_u, sigma_u = _alpha_sigma(schedule, u, z)
    alpha_s, sigma_s = _alpha_sigma(schedule, s, z)
    # 1. First-order (DDIM-equivalent) step t → u with the teacher at (z_t, t).
    x0_t, _ = denoise(z_t, t)
    x0_t = x0_t.to(work)
    z_u = dpm_solver_pp_first_order(z, x0_t, sigma_t, alpha_u, sigma_u, h_u)
    # 2. Teacher at (z_u, u); the full step t → s uses the r-weighted data prediction D.
    x0_u, _ = denoise(z_u.to(z_t.dtype), u)
    D = dpm_solver_pp_2s_denoised(x0_t, x0_u.to(work), r)
    return dpm_solver_pp_first_order(z, D, sigma_t, alpha_s, sigma_s, h).to(z_t.dtype)


SOLVERS: dict[str, Callable] = {
    "ddim": ddim_solver,
    "euler": euler_solver,
    "heun": heun_solver,
    "dpm_solver_2s": dpm_solver_2s_solver,
}

# Teacher evaluations (each one batched cond+uncond pass) per solver step: the cost side of the accuracy trade.
SOLVER_EVALUATIONS: dict[str, int] = {"ddim": 1, "euler": 1, "heun": 2, "dpm_solver_2s": 2}


def get_solver(name: str):
    """Look a solver up by name; an unknown name lists the valid ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid: {sorted(SOLVERS)}")
    return SOLVERS[name]
