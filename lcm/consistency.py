"""The consistency function and the latent consistency distillation loss (LCM arXiv:2310.04378 Alg. 1 / eq. 10).

Roles are callables; the loss does not know whether they are three UNets (full LCD), one UNet with adapters switched
(LCM-LoRA) or a toy MLP:
    student(z, t, cond, w) -> prediction      trainable; evaluated at t_{n+k}
    target(z, t, cond, w)  -> prediction      θ⁻ (EMA or the online weights), evaluated at t_n under no_grad
    teacher(z, t, cond)    -> prediction      frozen; called once per solver evaluation on 2B rows [cond; uncond]
Predictions are in the model's `prediction_type` and are converted to x̂₀ / ε̂ through `parameterization.to_x0_eps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .constants import HUBER_C, SIGMA_DATA, TIMESTEP_SCALING
from .guidance import cfg, sample_w
from .parameterization import append_dims, boundary_scalings, to_x0_eps
from .schedule import NoiseSchedule, SolverGrid
from .solvers import ddim_step, get_solver


def consistency_fn(z, x0_hat, c_skip, c_out):
    """f(z, t) = c_skip(t)·z + c_out(t)·x̂₀(z, t) (LCM eq. 5 parameterisation)."""
    return c_skip * z + c_out * x0_hat


def l2_loss(a, b, c: float = 0.0):
    """Per-sample mean squared error."""
    return (a - b).pow(2).flatten(1).mean(1)


def pseudo_huber_loss(a, b, c: float = HUBER_C):
    """Per-sample mean of √((a − b)² + c²) − c, element-wise as LCM-LoRA does (Song & Dhariwal 2023, arXiv:2310.14189 §3.3)."""
    return ((a - b).pow(2) + c * c).sqrt().sub(c).flatten(1).mean(1)


LOSSES: dict[str, Callable] = {"l2": l2_loss, "huber": pseudo_huber_loss}


def uniform_weights(schedule: NoiseSchedule, grid: SolverGrid) -> torch.Tensor:
    """Every grid pair weighs the same (LCM, LCM-LoRA)."""
    return torch.ones(grid.N)


def inverse_delta_weights(schedule: NoiseSchedule, grid: SolverGrid) -> torch.Tensor:
    """λ_i ∝ 1 / (σ(τ_i) − σ(τ_i − k)) in the EDM noise level σ = σ_t / α_t, the weighting of improved consistency
    training (Song & Dhariwal 2023, arXiv:2310.14189 §3.4), normalised to mean 1 over the grid. Pairs at small t, where
    one step moves the noise level least, weigh more."""
    t_nk, t_n = grid.pair(torch.arange(grid.N))
    a_nk, s_nk = schedule.alpha_sigma(t_nk)
    a_n, s_n = schedule.alpha_sigma(t_n)
    weights = 1.0 / (s_nk / a_nk - s_n / a_n)
    return weights / weights.mean()


LOSS_WEIGHTINGS: dict[str, Callable] = {"uniform": uniform_weights, "inverse_delta": inverse_delta_weights}


def cat_cond(cond: dict, uncond: dict) -> dict:
    """Stack conditional and unconditional inputs along the batch so the teacher runs once on 2B rows."""
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond and uncond differ in keys: {sorted(cond)} vs {sorted(uncond)}")
    return {k: torch.cat([cond[k], uncond[k]], dim=0) for k in cond}


@dataclass
class LCDSpec:
    """The fixed parts of the loss: schedule, grid, teacher solver, loss metric and boundary-scaling constants."""

    schedule: NoiseSchedule
    grid: SolverGrid
    prediction_type: str = "epsilon"
    solver: str = "ddim"
    loss: str = "huber"
    huber_c: float = HUBER_C
    sigma_data: float = SIGMA_DATA
    timestep_scaling: float = TIMESTEP_SCALING
    teacher_batched: bool = True  # False: cond and uncond in two teacher calls (same result; for benchmarks)
    loss_weighting: str = "uniform"  # a LOSS_WEIGHTINGS key: the per-grid-pair weight λ_i of the loss
    teacher_cfg: bool = True  # False ("normal CFG"): the teacher's unguided ODE, one conditional call, no w
    terminal_pure_noise: bool = False  # True: at t_{n+k} = T − 1 the pair starts from pure ε, as sampling does

    def __post_init__(self):
        get_solver(self.solver)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid: {sorted(LOSSES)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.loss_weighting!r}; valid: {sorted(LOSS_WEIGHTINGS)}")
        self.pair_weights = LOSS_WEIGHTINGS[self.loss_weighting](self.schedule, self.grid)


@dataclass
class LCDBatch:
    """Everything random is drawn before the loss: z₀ (clean latents), noise ε, grid indices and guidance w."""

    z0: torch.Tensor
    noise: torch.Tensor
    index: torch.Tensor
    w: torch.Tensor
    cond: dict = field(default_factory=dict)
    uncond: dict = field(default_factory=dict)


def per_sample_randn(shape, generators: list[torch.Generator], device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of `shape`, row i drawn from `generators[i]` on that generator's device, then moved to
    `device`: a sample's noise does not depend on its batch (what diffusers' `randn_tensor` does for a list)."""
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)


def per_sample_rand(generators: list[torch.Generator]) -> torch.Tensor:
    """One U[0, 1) draw per sample in float64, row i from `generators[i]` (on its device): the per-sample coin and
    position draws of the objectives, independent of the batch like `per_sample_randn`."""
    return torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64) for g in generators])


def draw_lcd_batch(mu: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict,
                   generators: list[torch.Generator], grid: SolverGrid, w_min: float, w_max: float, device) -> LCDBatch:
    """Every random draw of one training step, each sample's from its own generator, so a sample gets the same draws
    whatever batch, rank or device it lands in: z₀ = μ + σ·ε_vae ~ q(z|x), the noise ε, the grid index n ~ U{0, …, N−1}
    and the guidance w ~ U[w_min, w_max] (LCM Alg. 1). The order of the draws is part of the seeding contract."""
    if len(generators) != mu.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {mu.shape[0]}: need one per sample")
    z0 = mu + sigma * per_sample_randn(mu.shape, generators, mu.device, mu.dtype)
    return LCDBatch(z0=z0, noise=per_sample_randn(z0.shape, generators, z0.device, z0.dtype),
                    index=torch.cat([grid.sample_index(1, g) for g in generators]).to(device),
                    w=torch.cat([sample_w(1, w_min, w_max, g) for g in generators]).to(device),
                    cond=cond, uncond=uncond)


def guided_denoiser(teacher, cond: dict, uncond: dict, w, schedule: NoiseSchedule, prediction_type: str,
                    batched: bool = True, guided: bool = True):
    """The teacher as `denoise(z, t) -> (x̂₀, ε̂)` with CFG in the LCM convention, one batched call per evaluation
    (`batched=False` makes two calls, cond then uncond: the reference scripts' way, kept to measure the difference).
    `guided=False` is the unguided teacher ("normal CFG" distillation): one conditional call, `w` and `uncond` unused;
    it equals CFG at w = 0 without the unconditional half."""
    both = cat_cond(cond, uncond) if batched and guided else None

    def denoise(z, t):
        if not guided:
            alpha, sigma = schedule.alpha_sigma(t, z.ndim)
            pred = teacher(z, t, cond)
            return to_x0_eps(pred, z, alpha.to(pred.dtype), sigma.to(pred.dtype), prediction_type)
        if batched:
            pred = teacher(torch.cat([z, z]), torch.cat([t, t]), both)
        else:
            pred = torch.cat([teacher(z, t, cond), teacher(z, t, uncond)])
        alpha, sigma = schedule.alpha_sigma(torch.cat([t, t]), z.ndim)
        x0, eps = to_x0_eps(pred, torch.cat([z, z]), alpha.to(pred.dtype), sigma.to(pred.dtype), prediction_type)
        x0_c, x0_u = x0.chunk(2)
        eps_c, eps_u = eps.chunk(2)
        # CFG is linear in the prediction, so guiding x̂₀ and ε̂ separately equals guiding the raw output.
        return cfg(x0_c, x0_u, w), cfg(eps_c, eps_u, w)

    return denoise


def predict_x0_eps(model, z, t, cond, w, spec: LCDSpec):
    """(x̂₀, ε̂)(z, t) from a role callable: its prediction in the model's `prediction_type`, converted."""
    pred = model(z, t, cond, w)
    alpha, sigma = spec.schedule.alpha_sigma(t, z.ndim)
    return to_x0_eps(pred, z, alpha.to(pred.dtype), sigma.to(pred.dtype), spec.prediction_type)


def predict_x0(model, z, t, cond, w, spec: LCDSpec):
    """x̂₀(z, t) from a role callable (ADD's student output, and the inside of the consistency function)."""
    return predict_x0_eps(model, z, t, cond, w, spec)[0]


def predict_consistency(model, z, t, cond, w, spec: LCDSpec):
    """f_θ(z, t) from a role callable: prediction → x̂₀ → boundary-scaled combination with z."""
    x0_hat = predict_x0(model, z, t, cond, w, spec)
    c_skip, c_out = boundary_scalings(t, spec.sigma_data, spec.timestep_scaling)
    return consistency_fn(z, x0_hat, append_dims(c_skip, z.ndim).to(z.dtype), append_dims(c_out, z.ndim).to(z.dtype))


CLEAN_END = -1  # the end point s that means "the clean latent": LCD's boundary-scaled x̂₀, not a DDIM jump


@dataclass
class StudentOutputs:
    """What an adversarial term can judge from the student's one call at t_{n+k} (`lcd_terms`' third output):
    `clean` = f_θ(z, t_{n+k} → clean end), `at_end` = f_θ(z, t_{n+k} → s), the consistency output itself, and `end` = s
    per row (None: every row's end is the clean one, and `at_end` is `clean`)."""

    clean: torch.Tensor
    at_end: torch.Tensor
    end: torch.Tensor | None = None


def trajectory_fn(z, x0_hat, eps_hat, t, s, c_skip, c_out, alpha_s, sigma_s):
    """f(z, t → s), the consistency function toward an end point s ≤ t on the trajectory, per sample:
    s = CLEAN_END: c_skip(t)·z + c_out(t)·x̂₀ (LCM eq. 5, what LCD learns); s = t: z itself (the boundary condition);
    otherwise the semi-linear first-order (DDIM) map α_s x̂₀ + σ_s ε̂ (TCD arXiv:2402.19159 eq. 9 with the
    first-order exponential integrator; PCM arXiv:2405.18407 eq. 6 per phase). `t`, `s` are shaped like z."""
    clean = consistency_fn(z, x0_hat, c_skip, c_out)
    jump = ddim_step(x0_hat, eps_hat, alpha_s, sigma_s)
    return torch.where(s == CLEAN_END, clean, torch.where(t == s, z, jump))


def predict_trajectory(model, z, t, s, cond, w, spec: LCDSpec, with_clean: bool = False):
    """f_θ(z, t → s) from a role callable (`trajectory_fn`); s all CLEAN_END is exactly `predict_consistency`.
    `with_clean=True` returns (f_θ(z, t → s), f_θ(z, t → clean end)) from the same network call: the second is the
    clean-latent estimate the adversarial terms judge (`objectives.with_adversarial_term`)."""
    if bool((s == CLEAN_END).all()):
        f = predict_consistency(model, z, t, cond, w, spec)
        return (f, f) if with_clean else f
    x0_hat, eps_hat = predict_x0_eps(model, z, t, cond, w, spec)
    c_skip, c_out = boundary_scalings(t, spec.sigma_data, spec.timestep_scaling)
    c_skip, c_out = append_dims(c_skip, z.ndim).to(z.dtype), append_dims(c_out, z.ndim).to(z.dtype)
    alpha_s, sigma_s = spec.schedule.alpha_sigma(s.clamp(min=0), z.ndim)
    f = trajectory_fn(z, x0_hat, eps_hat, append_dims(t, z.ndim), append_dims(s, z.ndim), c_skip, c_out,
                      alpha_s.to(z.dtype), sigma_s.to(z.dtype))
    return (f, consistency_fn(z, x0_hat, c_skip, c_out)) if with_clean else f


def terminal_as_pure_noise(z_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, T: int) -> torch.Tensor:
    """z_t with the rows at t = T − 1 replaced by their noise ε: the input every sampler starts from.

    SD-style schedules do not reach zero SNR (√ᾱ_999 = 0.068 for scaled_linear 0.00085–0.012), so a forward-diffused
    z_999 still holds 6.8% of z₀, while a sampler starts its first step at t = 999 from pure ε (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv:2305.08891 §2). A student trained only on the
    leaked z_999 can read z₀ from it, and at one step it meets an input it never saw. SDXL-Lightning (arXiv:2402.13929
    §3.5) trains its first segment the same way (lcm/lightning.py `start_latents`). `noise` is the sampler's own start:
    ε for LCMScheduler / TCDScheduler / DDIM (init_noise_sigma 1), σ_{T−1}·ε for an Euler sampler.
    """
    top = (t == T - 1).view(-1, *([1] * (z_t.ndim - 1)))
    return torch.where(top, noise.to(z_t.dtype), z_t)


def with_self_generated_z0(target, batch: LCDBatch, spec: LCDSpec, share: float, generators) -> LCDBatch:
    """The batch with a `share` of its clean latents replaced by the target's own estimate, so the loss also sees the
    inputs a multistep sampler feeds the student: z₀' = f_θ⁻(α_s z₀ + σ_s ε', s), re-noised to t_{n+k} by the loss.
    s is a grid timestep above t_{n+k}, drawn uniformly (the step before, in some sampler's schedule); rows at the top
    pair have none above and keep z₀. Per sample, after the batch's own draws: u (chosen when u < share), v (which
    timestep above), ε'. share = 0 draws nothing and returns the batch itself. The teacher's ODE step and the target
    are then taken from the new z_{t_{n+k}} as for any other row."""
    if share <= 0:
        return batch
    # the row bookkeeping is on the CPU, whatever device the generators and the batch live on
    u = per_sample_rand(generators).cpu()
    v = per_sample_rand(generators).cpu()
    noise = per_sample_randn(batch.z0.shape, generators, batch.z0.device, batch.z0.dtype)
    index = batch.index.cpu()
    above = spec.grid.N - 1 - index  # how many grid timesteps lie above t_{n+k}
    chosen = (u < share) & (above > 0)
    if not bool(chosen.any()):
        return batch
    j = (index + 1 + torch.floor(v * above.double()).long()).clamp(max=spec.grid.N - 1)  # v < 1: j ≤ N − 1 anyway
    s = spec.grid.pair(j)[0]
    rows = chosen.nonzero().squeeze(1).to(batch.z0.device)
    s_rows = s[chosen].to(batch.z0.device)
    z_s = spec.schedule.add_noise(batch.z0[rows], noise[rows], s_rows)
    cond = {k: v_[rows] if torch.is_tensor(v_) else v_ for k, v_ in batch.cond.items()}
    with torch.no_grad():
        z0_self = predict_consistency(target, z_s, s_rows, cond, batch.w[rows], spec)
    z0 = batch.z0.clone()
    z0[rows] = z0_self.to(z0.dtype)
    return replace(batch, z0=z0)


def lcd_loss(student, target, teacher, batch: LCDBatch, spec: LCDSpec):
    """Per-sample d(f_θ(z_{t_{n+k}}, t_{n+k}), sg[f_θ⁻(ẑ_{t_n}, t_n)]) and a small diagnostics dict (LCM Alg. 1)."""
    loss, diagnostics, _ = lcd_terms(student, target, teacher, batch, spec)
    return loss, diagnostics


def lcd_terms(student, target, teacher, batch: LCDBatch, spec: LCDSpec, end=None):
    """`lcd_loss` plus the student's outputs with their graph (`StudentOutputs`): its clean-latent estimate
    f_θ(z_{t_{n+k}}, t_{n+k} → clean end) and its consistency output toward each row's end s (the objectives that add
    a term judge one of them; for LCD both are the consistency output itself, for an end s > 0 they come from the same
    network call). `end(t_nk, t_n) -> s` gives each sample's end point s ≤ t_n (PCM's phase edge, TCD's
    drawn s; lcm/trajectory.py); None is LCD's clean end, evaluated as before."""
    t_nk, t_n = spec.grid.pair(batch.index)
    s = None if end is None else end(t_nk, t_n)

    def consistency(model, z, t, with_clean=False):
        if s is None:
            f = predict_consistency(model, z, t, batch.cond, batch.w, spec)
            return (f, f) if with_clean else f
        return predict_trajectory(model, z, t, s, batch.cond, batch.w, spec, with_clean)

    # 1. Forward-diffuse the clean latent to t_{n+k}.
    z_tnk = spec.schedule.add_noise(batch.z0, batch.noise, t_nk)
    if spec.terminal_pure_noise:
        z_tnk = terminal_as_pure_noise(z_tnk, batch.noise, t_nk, spec.grid.T)
    # 2. Student's consistency output at t_{n+k} (gradients flow here only).
    f_student, clean_student = consistency(student, z_tnk, t_nk, with_clean=True)
    with torch.no_grad():
        # 3. One teacher ODE step t_{n+k} → t_n with CFG at the sampled w.
        denoise = guided_denoiser(teacher, batch.cond, batch.uncond, batch.w, spec.schedule, spec.prediction_type,
                                  spec.teacher_batched, spec.teacher_cfg)
        z_tn_hat = get_solver(spec.solver)(denoise, z_tnk, t_nk, t_n, spec.schedule)
        # 4. Target's consistency output at t_n — the stop-gradient side of the loss.
        f_target = consistency(target, z_tn_hat, t_n)
    loss = LOSSES[spec.loss](f_student.float(), f_target.float(), spec.huber_c)
    if spec.loss_weighting != "uniform":  # uniform multiplies by ones: skipped so the default stays bit-identical
        loss = loss * spec.pair_weights.to(loss.device)[batch.index]
    diagnostics = {
        "t_nk_mean": t_nk.float().mean().detach(),
        "w_mean": batch.w.float().mean().detach(),
        "target_norm": f_target.float().flatten(1).norm(dim=1).mean().detach(),
    }
    return loss, diagnostics, StudentOutputs(clean_student, f_student, s)
