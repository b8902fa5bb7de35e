"""SDXL-Lightning's progressive adversarial distillation (Lin et al. 2024, arXiv:2402.13929 §3), over role callables.

Progressive stages: the student learns an n-step sampler, then n/2, … (`distill.stages`, e.g. [8, 4, 2, 1]); each
stage starts from the previous stage's weights (training simply continues with the new n). In the stage with n steps
the student's timesteps are the n trailing ones of the `lightning` preset (EulerDiscreteScheduler, trailing: 999, 749,
499, 249 at n = 4). A sample draws one segment i: from t = τ_i to t' = τ_{i+1} (the clean latent after the last):

    x_t = α_t z₀ + σ_t ε                                  (forward-diffused data; σ_t ε at t = T − 1, as sampling)
    student:  x̂_{t'} = α_{t'} x̂₀_θ + σ_{t'} ε̂_θ         (one DDIM = Euler step; x̂₀_θ itself when t' is clean)
    teacher:  x_{t'}  = m DDIM steps of the guided teacher from x_t to t' (m = ⌈teacher_steps / n⌉)
    MSE stages (the warm start):   L = ‖x̂_{t'} − x_{t'}‖²
    adversarial stages:            L = w · L_G(D(x̂_{t'}, t', x_t, t, c)) [+ λ · MSE]  D steps on (x_{t'}, x̂_{t'})

The discriminator of the paper's conditional objective sees the pair: the encoder features of x_{t'} (at t', 0 for the
clean end) and of x_t (at t), concatenated per level (lcm/discriminator.py `make_pair_discriminator`). The relaxed
objective (`adversarial.conditional=false`) drops x_t. The 1-step stage predicts x₀ directly when
`distill.x0_one_step` (the network's output is read as a sample), exported as the `lightning-1step` preset.

An Euler step on an ε-prediction is the DDIM step in (x/α, σ) coordinates, so `lightning_sample` is exactly the stock
EulerDiscreteScheduler loop on trailing timesteps (tests/test_lightning.py). Pure torch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .adversarial import D_LOSSES, G_LOSSES, r1_penalty
from .consistency import CLEAN_END, LCDBatch, LCDSpec, guided_denoiser, terminal_as_pure_noise
from .parameterization import to_x0_eps
from .solvers import ddim_step


def stage_timesteps(n: int, T: int = 1000) -> torch.Tensor:
    """The n trailing timesteps, descending: EulerDiscreteScheduler's `timestep_spacing="trailing"` formula."""
    if n < 1:
        raise ValueError(f"a stage needs at least one step, got {n}")
    # numpy's arange(T, 0, -T/n) is T − i·(T/n); torch.round, like numpy's, rounds half to even
    return (T - torch.arange(n, dtype=torch.float64) * (T / n)).round().long() - 1


def check_stages(stages: Sequence[int], stage_steps: Optional[Sequence[int]], max_train_steps: int,
                 mse_stages: int = 0) -> list[int]:
    """Validate the progressive schedule and return the optimiser steps of each stage (`stage_steps`, or
    `max_train_steps` split evenly with the remainder in the last stage)."""
    stages = list(stages)
    if not stages or any(n < 1 for n in stages):
        raise ValueError(f"distill.stages={stages}: need at least one stage, each of at least one step")
    if any(a <= b for a, b in zip(stages, stages[1:])):
        raise ValueError(f"distill.stages={stages} must strictly decrease (each stage halves or cuts the steps)")
    if not 0 <= mse_stages <= len(stages):
        raise ValueError(f"distill.mse_stages={mse_stages} must be in [0, {len(stages)}] (the number of stages)")
    if stage_steps is None:
        base = max_train_steps // len(stages)
        if base < 1:
            raise ValueError(f"train.max_train_steps={max_train_steps} is fewer than the {len(stages)} stages")
        return [base] * (len(stages) - 1) + [max_train_steps - base * (len(stages) - 1)]
    steps = list(stage_steps)
    if len(steps) != len(stages) or any(s < 1 for s in steps) or sum(steps) != max_train_steps:
        raise ValueError(f"distill.stage_steps={steps} must give each of the {len(stages)} stages at least one step "
                         f"and sum to train.max_train_steps={max_train_steps}")
    return steps


def stage_at(step: int, steps_per_stage: Sequence[int]) -> int:
    """The index of the stage that optimiser step `step` (0-based) belongs to; steps past the end stay in the last."""
    bound = 0
    for i, s in enumerate(steps_per_stage):
        bound += s
        if step < bound:
            return i
    return len(steps_per_stage) - 1


class StageGrid:
    """One stage's segments (τ_i → τ_{i+1}, the last → CLEAN_END), one drawn uniformly per sample. It stands in for
    the LCD grid in `draw_lcd_batch` (same `sample_index` interface), so Lightning batches are drawn by the same code."""

    def __init__(self, n: int, T: int = 1000):
        self.n = self.N = n
        self.starts = stage_timesteps(n, T)
        self.ends = torch.cat([self.starts[1:], torch.tensor([CLEAN_END])])

    def sample_index(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.n, (batch,), generator=generator,
                             device=generator.device if generator else None).to(device)

    def pair(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.starts.to(index.device)[index], self.ends.to(index.device)[index]


def flow_step(x0_hat, eps_hat, t_end, schedule):
    """The deterministic step to t' per sample: α_{t'} x̂₀ + σ_{t'} ε̂, or x̂₀ itself where t' is CLEAN_END."""
    alpha, sigma = schedule.alpha_sigma(t_end.clamp(min=0), x0_hat.ndim)
    clean = (t_end == CLEAN_END).view(-1, *[1] * (x0_hat.ndim - 1))
    return torch.where(clean, x0_hat, ddim_step(x0_hat, eps_hat, alpha.to(x0_hat.dtype), sigma.to(x0_hat.dtype)))


def student_flow(student, z, t, t_end, cond, w, spec: LCDSpec, prediction_type: str):
    """The student's one-step flow x_t → x̂_{t'}; its output is read as `prediction_type` (sample for x₀ prediction)."""
    pred = student(z, t, cond, w)
    alpha, sigma = spec.schedule.alpha_sigma(t, z.ndim)
    x0_hat, eps_hat = to_x0_eps(pred, z, alpha.to(pred.dtype), sigma.to(pred.dtype), prediction_type)
    return flow_step(x0_hat, eps_hat, t_end, spec.schedule)


def teacher_timesteps(t: torch.Tensor, t_end: torch.Tensor, m: int) -> list[torch.Tensor]:
    """m + 1 per-sample timesteps from t down to t' (0 standing for the clean end), evenly spaced and rounded."""
    end = t_end.clamp(min=0).double()
    return [(t.double() + (end - t.double()) * j / m).round().long() for j in range(m + 1)]


@torch.no_grad()
def teacher_flow(denoise: Callable, z, t, t_end, m: int, schedule):
    """m DDIM steps of `denoise(z, t) -> (x̂₀, ε̂)` from x_t to t' per sample (the last one to x̂₀ at a clean end)."""
    points = teacher_timesteps(t, t_end, m)
    for j in range(m):
        x0_hat, eps_hat = denoise(z, points[j])
        last = j == m - 1
        nxt = torch.where(t_end == CLEAN_END, CLEAN_END, points[j + 1]) if last else points[j + 1]
        z = flow_step(x0_hat.float(), eps_hat.float(), nxt, schedule)
    return z


def lightning_sample(eps_model: Callable, noise, n: int, schedule, prediction_type: str = "epsilon"):
    """The n-step deterministic sampler the student is trained for: one `flow_step` per trailing timestep, what a
    diffusers pipeline with EulerDiscreteScheduler (trailing) does. The pipeline starts from noise × init_noise_sigma,
    which for trailing spacing is σ_max in Euler's x = z/α coordinates, i.e. z = σ_{τ_0}·noise (not unit variance).
    `eps_model(z, t) -> prediction`."""
    grid = StageGrid(n, schedule.T)
    z = noise * schedule.alpha_sigma(grid.starts[:1], noise.ndim)[1].to(noise.dtype)
    for i in range(n):
        t = grid.starts[i].repeat(len(z))
        pred = eps_model(z, t)
        alpha, sigma = schedule.alpha_sigma(t, z.ndim)
        x0_hat, eps_hat = to_x0_eps(pred, z, alpha, sigma, prediction_type)
        z = flow_step(x0_hat, eps_hat, grid.ends[i].repeat(len(z)), schedule)
    return z


@dataclass
class LightningStage:
    """What the loss needs of the current stage: its segments, whether it trains with MSE, and the output's meaning."""

    grid: StageGrid
    mse: bool
    prediction_type: str  # the student's output as read in this stage ("sample" in an x₀-prediction 1-step stage)
    teacher_steps: int  # m: teacher DDIM steps per segment
    mse_weight: float = 0.0  # the MSE kept beside L_G in adversarial stages (0: the paper's pure adversarial stages)


def make_stage(index: int, stages: Sequence[int], mse_stages: int, x0_one_step: bool, teacher_steps: int,
               prediction_type: str, T: int = 1000, mse_weight: float = 0.0) -> LightningStage:
    n = stages[index]
    return LightningStage(StageGrid(n, T), mse=index < mse_stages,
                          prediction_type="sample" if n == 1 and x0_one_step else prediction_type,
                          teacher_steps=max(1, math.ceil(teacher_steps / n)), mse_weight=mse_weight)


def start_latents(z0, noise, t, schedule):
    """x_t = α_t z₀ + σ_t ε, except at the top timestep T − 1, where it is σ_t ε: pure noise, as sampling starts
    (`lightning_sample`), so the first segment trains on the input the sampler gives it (SDXL-Lightning §3.5's
    schedule fix; ᾱ_{T−1} is not 0 on SD/SDXL betas)."""
    alpha, sigma = schedule.alpha_sigma(t, z0.ndim)
    return terminal_as_pure_noise(alpha.to(z0.dtype) * z0 + sigma.to(z0.dtype) * noise, sigma.to(z0.dtype) * noise, t,
                                  schedule.T)


def lightning_loss(student, teacher, discriminator, batch: LCDBatch, spec: LCDSpec, stage: LightningStage,
                   adv_loss: str, adv_weight: float):
    """Per-sample generator loss of one Lightning step (module docstring), diagnostics and the D step's handoff.
    `batch.index` indexes `stage.grid`; the teacher's guidance is the batch's w. `discriminator(x_end, t_end, x_start,
    t_start, cond) -> logits (B, L)`; unused in an MSE stage."""
    schedule = spec.schedule
    t, t_end = stage.grid.pair(batch.index)
    z_t = start_latents(batch.z0, batch.noise, t, schedule)
    fake = student_flow(student, z_t, t, t_end, batch.cond, batch.w, spec, stage.prediction_type).float()
    denoise = guided_denoiser(teacher, batch.cond, batch.uncond, batch.w, schedule, spec.prediction_type,
                              spec.teacher_batched, spec.teacher_cfg)
    real = teacher_flow(denoise, z_t, t, t_end, stage.teacher_steps, schedule).float()
    mse = (fake - real).pow(2).flatten(1).mean(1)
    diagnostics = {"mse": mse.mean().detach(), "stage_steps": torch.tensor(float(stage.grid.n))}
    if stage.mse:
        loss = mse
    else:
        g_adv = G_LOSSES[adv_loss](discriminator(fake, t_end, z_t, t, batch.cond))
        loss = adv_weight * g_adv
        if stage.mse_weight != 0:
            loss = loss + stage.mse_weight * mse
        diagnostics.update(g_adv=g_adv.mean().detach(), adv_weight=torch.tensor(float(adv_weight)))
    handoff = {"real": real, "fake": fake.detach(), "start": z_t, "t": t, "t_end": t_end, "cond": batch.cond}
    return loss, diagnostics, handoff


def lightning_discriminator_loss(discriminator, handoff: dict, adv_loss: str, r1_gamma: float = 0.0):
    """Per-sample L_D on (teacher x_{t'} real, student x̂_{t'} fake), both with their x_t, plus γ/2·R1 on the real
    x_{t'}; and D's diagnostics."""
    real, fake = handoff["real"].detach(), handoff["fake"].detach()
    args = (handoff["t_end"], handoff["start"].detach(), handoff["t"], handoff["cond"])
    if r1_gamma > 0:
        real = real.requires_grad_(True)
    # R1 differentiates ∇_x D again: only the math attention kernel has a double backward (as in objectives.py).
    with sdpa_kernel([SDPBackend.MATH]) if r1_gamma > 0 else contextlib.nullcontext():
        real_logits = discriminator(real, *args)
    fake_logits = discriminator(fake, *args)
    loss = D_LOSSES[adv_loss](real_logits, fake_logits)
    diagnostics = {"d_loss": loss.mean().detach(), "d_acc_real": (real_logits > 0).float().mean().detach(),
                   "d_acc_fake": (fake_logits < 0).float().mean().detach()}
    if r1_gamma > 0:
        penalty = r1_penalty(real_logits, real)
        loss = loss + 0.5 * r1_gamma * penalty
        diagnostics["r1"] = penalty.mean().detach()
    return loss, diagnostics
