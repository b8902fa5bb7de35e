"""The distillation objectives beside plain LCD, each a loss over role callables (DESIGN.md §2 `objectives`):

    lcd      consistency distillation (lcm/consistency.py `lcd_loss`), unchanged
    lcd_adv  LCD + w_adv · L_G(D(renoise(f_θ(z_{t_{n+k}}), t̂)))   (the adversarial term of Hyper-SD / PCM)
    pcm, tcd phased / trajectory consistency (lcm/trajectory.py): LCD toward a phase edge or a drawn s
    add      ADD, SDXL-Turbo (Sauer et al. 2023, arXiv:2311.17042 §3):
             L = L_G(D(renoise(x̂_θ(z_s, s), t̂))) + λ · c(t)·‖x̂_θ − sg[x̂_ψ(renoise(sg x̂_θ, t), t)]‖²

The discriminator `D(z, t̂, cond) -> logits (B, L)` (lcm/discriminator.py or a toy) is a role like the others.
A generator loss returns (per-sample loss, diagnostics, handoff): the handoff carries the step's real and generated x̂₀
(detached) to `discriminator_loss`, which the trainer runs next, on the same batch, with the discriminator's own
optimiser. Random draws (t̂, re-noising ε) come from the per-sample generators *after* the batch's own draws, in a
fixed order, so a sample's draws do not depend on its batch and `lcd_adv` at weight 0 draws LCD's batch bit for bit.
Pure torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .adversarial import D_LOSSES, G_LOSSES, forward_from, r1_penalty, sample_t_hat, sample_t_hat_above
from .consistency import (LCDBatch, LCDSpec, guided_denoiser, lcd_terms, per_sample_randn, predict_x0,
                          terminal_as_pure_noise)


JUDGED = ("clean", "end")  # what the *_adv term judges (`with_adversarial_term`)


@dataclass
class AdversarialSpec:
    """The fixed parts of the adversarial terms: the loss pair, R1's γ and the t̂ distribution (logit-normal)."""

    loss: str = "hinge"
    r1_gamma: float = 0.0  # R1 weight γ (the penalty is γ/2·‖∇D‖²); 0 = off
    t_hat_loc: float = 1.0
    t_hat_scale: float = 1.0
    t_hat_shift: float = 1.0
    # *_adv only: the generator term applies to the rows whose student timestep t_{n+k} is at most this (999 = all);
    # the discriminator still judges every row's clean estimate
    student_t_max: int = 999
    # *_adv only: "clean" judges the student's clean estimate; "end" its output at the row's end point s
    judge: str = "clean"

    def __post_init__(self):
        if self.loss not in D_LOSSES:
            raise ValueError(f"unknown adversarial loss {self.loss!r}; valid: {sorted(D_LOSSES)}")
        if self.judge not in JUDGED:
            raise ValueError(f"unknown adversarial.judge {self.judge!r}; valid: {list(JUDGED)}")


def _judge(discriminator, x, cond, generators, schedule, adv: AdversarialSpec, requires_grad: bool = False,
           end=None, x_at_end: bool = False):
    """D's logits on x re-noised to a per-sample t̂ (one t̂ and one ε per sample's generator); returns (logits, z_t̂).
    x is a clean latent, judged at t̂ on [0, T − 1]; with `end` (each row's end point s, −1 = clean) t̂ is drawn on
    [s, T − 1] instead, and with `x_at_end` x is a sample at s, carried to t̂ by the forward transition."""
    if end is None:
        t_hat = sample_t_hat(len(x), generators, schedule.T, adv.t_hat_loc, adv.t_hat_scale, adv.t_hat_shift, x.device)
    else:
        t_hat = sample_t_hat_above(end.clamp(min=0), generators, schedule.T, adv.t_hat_loc, adv.t_hat_scale,
                                   adv.t_hat_shift, x.device)
    noise = per_sample_randn(x.shape, generators, x.device, x.dtype)
    if end is not None and x_at_end:
        z = forward_from(x, noise, end.to(x.device), t_hat, schedule)
    else:
        z = schedule.add_noise(x, noise, t_hat)
    if requires_grad:
        z = z.detach().requires_grad_(True)
    return discriminator(z, t_hat, cond), z


def generator_adversarial_term(discriminator, x_fake, cond, generators, schedule, adv: AdversarialSpec, end=None):
    """Per-sample L_G on the generated sample (gradients flow through D, whose own parameters the caller freezes):
    a clean estimate, or with `end` a sample at each row's end point s (`_judge`)."""
    logits, _ = _judge(discriminator, x_fake, cond, generators, schedule, adv, end=end, x_at_end=True)
    return G_LOSSES[adv.loss](logits), logits


def discriminator_loss(discriminator, handoff: dict, generators, schedule, adv: AdversarialSpec):
    """Per-sample L_D on real vs generated x̂₀ (+ γ/2·R1 on the real inputs) and D's diagnostics.
    Real and fake are judged at independent t̂ and ε draws; both are detached from the generator. With the handoff's
    "end" (adversarial.judge=end) the fake is each row's sample at its end point s, and both are judged at t̂ ≥ s:
    the real clean latent noised there directly, the fake carried from s by the forward transition."""
    real, fake, cond = handoff["real"].detach(), handoff["fake"].detach(), handoff["cond"]
    end = handoff.get("end")
    r1 = adv.r1_gamma > 0
    # R1 differentiates ∇_x D again in the backward pass; fused attention kernels (flash / memory-efficient) have no
    # double backward, the math one does, so the real inputs are judged with it when R1 is on.
    with sdpa_kernel([SDPBackend.MATH]) if r1 else contextlib.nullcontext():
        real_logits, z_real = _judge(discriminator, real, cond, generators, schedule, adv, requires_grad=r1, end=end)
    fake_logits, _ = _judge(discriminator, fake, cond, generators, schedule, adv, end=end, x_at_end=True)
    loss = D_LOSSES[adv.loss](real_logits, fake_logits)
    diagnostics = {"d_loss": loss.mean().detach(),
                   "d_acc_real": (real_logits > 0).float().mean().detach(),
                   "d_acc_fake": (fake_logits < 0).float().mean().detach()}
    if r1:
        penalty = r1_penalty(real_logits, z_real)
        loss = loss + 0.5 * adv.r1_gamma * penalty
        diagnostics["r1"] = penalty.mean().detach()
    return loss, diagnostics


def with_adversarial_term(terms, discriminator, batch: LCDBatch, spec: LCDSpec, adv: AdversarialSpec, weight: float,
                          generators):
    """A consistency objective's `(loss, diagnostics, StudentOutputs)` (`lcd_terms`, `trajectory.pcm_terms`,
    `trajectory.tcd_terms`) plus `weight` × the generator's adversarial term, and the discriminator's handoff.
    adv.judge = "clean" judges the clean estimate f_θ(z_{t_{n+k}} → clean end); "end" judges the consistency output at
    each row's end point s (PCM's phase edge, TCD's drawn s) at a t̂ ≥ s, the sample the sampler actually takes (for
    LCD the two are the same). The term's draws (t̂, ε) come after the objective's own, so weight = 0 leaves its loss
    and gradients exactly as the plain objective's. With `adv.student_t_max` below T − 1 the term is zero on the rows
    whose t_{n+k} lies above it (the 1-step sampler's t = 999 prediction stays the plain one's)."""
    loss, diagnostics, outputs = terms
    end = outputs.end if adv.judge == "end" else None
    fake = outputs.clean if end is None else outputs.at_end
    g_adv, logits = generator_adversarial_term(discriminator, fake.float(), batch.cond, generators, spec.schedule, adv,
                                               end)
    if adv.student_t_max < spec.schedule.T - 1:  # the draws above stay those of every row
        t_nk, _ = spec.grid.pair(batch.index)
        g_adv = g_adv * (t_nk.to(g_adv.device) <= adv.student_t_max).to(g_adv.dtype)
    if weight != 0:  # skipped at 0: x + 0·y is x, but 0·inf is not
        loss = loss + weight * g_adv
    diagnostics.update(g_adv=g_adv.mean().detach(), adv_weight=torch.tensor(float(weight)))
    handoff = {"real": batch.z0, "fake": fake.detach().float(), "cond": batch.cond}
    if end is not None:
        handoff["end"] = end
    return loss, diagnostics, handoff


def lcd_adv_loss(student, target, teacher, discriminator, batch: LCDBatch, spec: LCDSpec, adv: AdversarialSpec,
                 weight: float, generators):
    """LCD plus `weight` × the generator's adversarial term on the student's consistency output f_θ(z_{t_{n+k}}),
    its estimate of the clean latent. weight = 0 leaves the LCD loss and its gradients exactly as `lcd_loss`'s."""
    return with_adversarial_term(lcd_terms(student, target, teacher, batch, spec), discriminator, batch, spec, adv,
                                 weight, generators)


class StudentTimesteps:
    """ADD's fixed student timesteps (default 999, 749, 499, 249), one drawn uniformly per sample. It stands in for
    the LCD grid in `draw_lcd_batch` (same `sample_index` interface), so ADD batches are drawn by the same code."""

    def __init__(self, timesteps):
        self.timesteps = torch.tensor(list(timesteps), dtype=torch.long)
        self.N = len(self.timesteps)

    def sample_index(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.N, (batch,), generator=generator, device=generator.device if generator else None
                             ).to(device)

    def at(self, index: torch.Tensor) -> torch.Tensor:
        return self.timesteps.to(index.device)[index]


def uniform_distill_weight(alpha, sigma):
    return torch.ones_like(alpha)


def alpha_bar_distill_weight(alpha, sigma):
    """c(t) = ᾱ_t = α_t²: high-noise teacher queries, whose x̂₀ is least informative, weigh least."""
    return alpha.pow(2)


ADD_WEIGHTINGS: dict[str, Callable] = {"alpha_bar": alpha_bar_distill_weight, "uniform": uniform_distill_weight}


@dataclass
class ADDSpec:
    """ADD's fixed parts: the student timesteps, the distillation weight λ and its c(t)."""

    student_timesteps: StudentTimesteps
    distill_weight: float = 2.5  # λ (ADD §4: 2.5)
    weighting: str = "alpha_bar"

    def __post_init__(self):
        if self.weighting not in ADD_WEIGHTINGS:
            raise ValueError(f"unknown ADD weighting {self.weighting!r}; valid: {sorted(ADD_WEIGHTINGS)}")


def add_loss(student, teacher, discriminator, batch: LCDBatch, spec: LCDSpec, add: ADDSpec, adv: AdversarialSpec,
             adv_weight: float, generators):
    """ADD's generator loss per sample (arXiv:2311.17042 §3.2): adversarial + λ·distillation. `batch.index` indexes
    `add.student_timesteps`; the teacher's t is uniform on {1, …, T − 1} and its guidance is the batch's w."""
    schedule = spec.schedule
    # 1. Forward-diffuse real latents to the student's timestep s and denoise in one step.
    s = add.student_timesteps.at(batch.index)
    z_s = schedule.add_noise(batch.z0, batch.noise, s)
    if spec.terminal_pure_noise:  # turbo's Euler sampler starts at T − 1 from σ·ε in these (VP) coordinates
        z_s = terminal_as_pure_noise(z_s, schedule.alpha_sigma(s, z_s.ndim)[1].to(z_s.dtype) * batch.noise, s,
                                     schedule.T)
    x0_theta = predict_x0(student, z_s, s, batch.cond, batch.w, spec).float()
    # 2. The adversarial term on x̂_θ.
    g_adv, _ = generator_adversarial_term(discriminator, x0_theta, batch.cond, generators, schedule, adv)
    # 3. Distillation: re-noise sg[x̂_θ] to the teacher's t and regress x̂_θ on the teacher's CFG x̂₀ there.
    t = torch.cat([torch.randint(1, schedule.T, (1,), generator=g, device=g.device) for g in generators]).to(s.device)
    eps = per_sample_randn(x0_theta.shape, generators, x0_theta.device, x0_theta.dtype)
    with torch.no_grad():
        z_t = schedule.add_noise(x0_theta.detach(), eps, t)
        denoise = guided_denoiser(teacher, batch.cond, batch.uncond, batch.w, schedule, spec.prediction_type,
                                  spec.teacher_batched, spec.teacher_cfg)
        x0_psi, _ = denoise(z_t, t)
    alpha, sigma = schedule.alpha_sigma(t)
    c_t = ADD_WEIGHTINGS[add.weighting](alpha, sigma)
    distill = c_t * (x0_theta - x0_psi.float()).pow(2).flatten(1).mean(1)
    loss = add.distill_weight * distill + (adv_weight * g_adv if adv_weight != 0 else 0.0)
    diagnostics = {"g_adv": g_adv.mean().detach(), "distill": distill.mean().detach(),
                   "adv_weight": torch.tensor(float(adv_weight))}
    return loss, diagnostics, {"real": batch.z0, "fake": x0_theta.detach(), "cond": batch.cond}


# pcm and tcd (lcm/trajectory.py) are consistency objectives toward an end point s > 0; no discriminator.
# lcd_adv / pcm_adv / tcd_adv: the consistency objective plus the adversarial term on its clean estimate
# (`with_adversarial_term`); they train, export and sample exactly like their base objective otherwise.
# lightning (lcm/lightning.py): progressive adversarial distillation with a pair discriminator.
OBJECTIVES = ("lcd", "lcd_adv", "add", "pcm", "pcm_adv", "tcd", "tcd_adv", "lightning")
ADVERSARIAL_VARIANTS = {"lcd_adv": "lcd", "pcm_adv": "pcm", "tcd_adv": "tcd"}


def base_objective(objective: str) -> str:
    """The consistency objective an `*_adv` objective adds its term to (its sampler, grid and export); else itself."""
    return ADVERSARIAL_VARIANTS.get(objective, objective)
