"""Adversarial distillation on the Gaussian-mixture oracle (lcm/oracle.py): a toy discriminator and the ADD training
loop, on the same `add_loss` / `discriminator_loss` the trainer uses, so the objective's math is checked cheaply
against an exact teacher and exact data (tests/test_objectives.py).
"""

from __future__ import annotations

import math

import torch

from .adversarial import frozen, time_features, warmed_up_weight
from .consistency import LCDBatch, LCDSpec
from .guidance import sample_w
from .consistency import predict_x0
from .objectives import ADDSpec, AdversarialSpec, add_loss, discriminator_loss
from .oracle import GaussianMixture, OracleTeacher
from .schedule import NoiseSchedule


class MLPDiscriminator(torch.nn.Module):
    """D(z_t̂, t̂, cond) -> logits (B, 1) for d-dimensional toy data: an MLP on [z_t̂/√(α²σ_d² + σ²), time features]
    plus a projection onto a class embedding (the toy's text conditioning)."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, hidden: int = 128, freqs: int = 8):
        super().__init__()
        self.schedule, self.freqs = schedule, freqs
        self.body = torch.nn.Sequential(
            torch.nn.Linear(mixture.dim + 2 * freqs, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU())
        self.logit = torch.nn.Linear(hidden, 1)
        self.class_emb = torch.nn.Embedding(mixture.num_classes + 1, hidden)
        scale = (mixture.means.pow(2).mean() + mixture.stds.pow(2).mean()).sqrt()
        self.register_buffer("sigma_data", scale.float())

    def forward(self, z, t, cond):
        alpha, sigma = self.schedule.alpha_sigma(t, z.ndim)
        x = z / (alpha.pow(2) * self.sigma_data**2 + sigma.pow(2)).sqrt()  # unit scale at every t̂
        h = self.body(torch.cat([x, time_features(t, self.schedule.T, self.freqs)], dim=1))
        projection = (h * self.class_emb(cond["y"].long())).sum(1, keepdim=True) / math.sqrt(h.shape[1])
        return self.logit(h) + projection


def distill_add(student, teacher: OracleTeacher, spec: LCDSpec, add: ADDSpec, adv: AdversarialSpec, *,
                steps: int = 1500, batch: int = 256, lr: float = 1e-3, d_lr: float = 1e-3,
                adv_weight: float = 1.0, adv_warmup: int = 0, w_range=(0.0, 2.0), seed: int = 0):
    """ADD of `student` from the oracle: each step one generator update (D frozen), then one discriminator update on
    the step's real and generated x̂₀, each with its own Adam (β₁ = 0, as GANs train). Returns the discriminator."""
    mixture = teacher.mixture
    g = torch.Generator().manual_seed(seed)
    disc = MLPDiscriminator(mixture, spec.schedule)
    g_opt = torch.optim.Adam(student.parameters(), lr=lr, betas=(0.0, 0.99))
    d_opt = torch.optim.Adam(disc.parameters(), lr=d_lr, betas=(0.0, 0.99))
    for step in range(steps):
        # 1. The batch: classes, data, forward noise, the student's timestep index, guidance; per-sample generators
        #    for the objective's own draws (t̂, re-noising ε, the teacher's t).
        y = mixture.sample_classes(batch, g)
        lcd_batch = LCDBatch(z0=mixture.sample(y, g), noise=torch.randn(batch, mixture.dim, generator=g),
                             index=add.student_timesteps.sample_index(batch, g), w=sample_w(batch, *w_range, g),
                             cond={"y": y}, uncond={"y": torch.full_like(y, mixture.null_class)})
        base = int(torch.randint(0, 2**62, (1,), generator=g))
        gens = [torch.Generator().manual_seed(base + i) for i in range(batch)]
        # 2. Generator step, D frozen.
        with frozen(disc):
            loss, _, handoff = add_loss(student, teacher, disc, lcd_batch, spec, add, adv,
                                        warmed_up_weight(adv_weight, adv_warmup, step), gens)
        g_opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        g_opt.step()
        # 3. Discriminator step on the same step's real and generated samples.
        d_loss, _ = discriminator_loss(disc, handoff, gens, spec.schedule, adv)
        d_opt.zero_grad(set_to_none=True)
        d_loss.mean().backward()
        d_opt.step()
    return disc


def one_step_add_sample(student, z_T, cond, w, spec: LCDSpec, t: int | None = None):
    """The ADD student's 1-step sample: x̂_θ(z_T, T − 1) from pure noise (the `turbo` preset at one step)."""
    t_b = torch.full((len(z_T),), spec.schedule.T - 1 if t is None else t, dtype=torch.long)
    return predict_x0(student, z_T, t_b, cond, w, spec)


def distance_to_class(mixture: GaussianMixture, x, y) -> torch.Tensor:
    """Per sample, the distance from x to the nearest component mean of its own class y."""
    means = mixture.means[y.long()]  # (B, M, d)
    return (x[:, None, :] - means).norm(dim=-1).min(dim=1).values
