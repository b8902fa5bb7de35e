"""Phased and trajectory consistency: LCD toward an end point s > 0 instead of the clean latent (DESIGN.md §2).

    pcm  phased consistency (Wang et al. 2024, arXiv:2405.18407 §3): the N-step grid is cut into M phases; a sample in
         phase m is mapped to the phase's lower edge s_m (the clean end for the lowest phase), so M = 1 is LCD exactly.
         Sampling is deterministic, one jump per phase: edge to edge, then the clean end.
    tcd  trajectory consistency (Zheng et al. 2024, arXiv:2402.19159 §4): the end point s is drawn per sample,
         uniform on the integer timesteps {0, …, t_n}, and reached by the semi-linear consistency function; sampling
         is TCDScheduler's strategic stochastic sampling with its gamma.

The consistency function f(z, t → s) itself is `consistency.trajectory_fn`; this module picks s. Phase edges sit on
the training grid τ_i = (i+1)·k − 1 at s_m = m·T/M − 1, which are exactly the timesteps of diffusers' DDIMScheduler
with "trailing" spacing at M steps (999, 499 for M = 2), so a stock DDIM pipeline walks the trainer's phases; its last
step goes to ᾱ = 1 (`set_alpha_to_one`), the clean x̂₀, where the trainer's lowest phase uses LCD's c_skip/c_out form:
the two differ by c_skip(T/M − 1)·(z − x̂₀), below 2e-6 of z for every M ≤ N at timestep_scaling 10. Pure torch.
"""

from __future__ import annotations

import torch

from .consistency import CLEAN_END, LCDBatch, LCDSpec, lcd_terms, per_sample_rand, predict_trajectory
from .schedule import SolverGrid


def check_phases(grid: SolverGrid, phases: int) -> None:
    """M must divide N (each phase holds N/M grid points) and be at least 1; the error names the keys."""
    if phases < 1 or grid.N % phases:
        raise ValueError(f"distill.phases={phases} must be >= 1 and divide distill.num_ddim_timesteps={grid.N}")


def phase_edges(grid: SolverGrid, phases: int) -> torch.Tensor:
    """The lower edge s of each grid index's phase (N,): CLEAN_END in the lowest phase, else τ_{m·N/M − 1}."""
    check_phases(grid, phases)
    per = grid.N // phases
    phase = torch.arange(grid.N) // per
    edge = grid.timesteps[(phase * per - 1).clamp(min=0)]
    return torch.where(phase == 0, torch.full_like(edge, CLEAN_END), edge)


def phase_timesteps(grid: SolverGrid, phases: int) -> list[int]:
    """The M sampling timesteps, descending: each phase's top τ_{(m+1)·N/M − 1} = (m+1)·T/M − 1."""
    check_phases(grid, phases)
    per = grid.N // phases
    return [int(grid.timesteps[(m + 1) * per - 1]) for m in reversed(range(phases))]


def pcm_end(grid: SolverGrid, phases: int):
    """`lcd_terms`' end-point function for PCM: each sample's phase edge, looked up from t_{n+k}'s grid index."""
    edges = phase_edges(grid, phases)

    def end(t_nk, t_n):
        index = torch.div(t_nk + 1, grid.k, rounding_mode="floor") - 1  # τ_i = (i+1)·k − 1
        return edges.to(t_nk.device)[index]

    return end


def pcm_terms(student, target, teacher, batch: LCDBatch, spec: LCDSpec, phases: int):
    """`pcm_loss` plus the student's outputs (`lcd_terms`' third), which `pcm_adv` judges."""
    end = None if phases == 1 else pcm_end(spec.grid, phases)
    return lcd_terms(student, target, teacher, batch, spec, end)


def pcm_loss(student, target, teacher, batch: LCDBatch, spec: LCDSpec, phases: int):
    """Per-sample d(f_θ(z_{t_{n+k}}, t_{n+k} → s_m), sg[f_θ⁻(ẑ_{t_n}, t_n → s_m)]) with s_m the phase's lower edge
    (PCM arXiv:2405.18407 Alg. 1, without its adversarial term: `pcm_adv` adds one). M = 1 is `lcd_loss` bit for bit."""
    loss, diagnostics, _ = pcm_terms(student, target, teacher, batch, spec, phases)
    return loss, diagnostics


def draw_tcd_end(t_n: torch.Tensor, generators: list[torch.Generator], clean_share: float = 0.0) -> torch.Tensor:
    """s ~ U{0, …, t_n} per sample, from that sample's generator (drawn after the batch's own draws). With
    `clean_share` > 0 a second draw per sample then sends that share of the rows to the clean end (LCD's target);
    0 draws nothing more, and 1 is LCD on every row."""
    u = per_sample_rand(generators)
    s = torch.floor(u.to(t_n.device) * (t_n.double() + 1)).long().clamp(max=t_n)
    if clean_share > 0:
        c = per_sample_rand(generators)
        s = torch.where(c.to(t_n.device) < clean_share, torch.full_like(s, CLEAN_END), s)
    return s


def tcd_terms(student, target, teacher, batch: LCDBatch, spec: LCDSpec, generators, clean_share: float = 0.0):
    """`tcd_loss` plus the student's outputs (`lcd_terms`' third), which `tcd_adv` judges."""
    drawn = {}

    def end(t_nk, t_n):
        drawn["s"] = draw_tcd_end(t_n, generators, clean_share)
        return drawn["s"]

    loss, diagnostics, outputs = lcd_terms(student, target, teacher, batch, spec, end)
    on_trajectory = drawn["s"] != CLEAN_END
    # the mean drawn s over the rows on the trajectory (CLEAN_END when every row went to the clean end)
    diagnostics["s_mean"] = (drawn["s"][on_trajectory].float().mean() if bool(on_trajectory.any())
                             else torch.tensor(float(CLEAN_END)))
    return loss, diagnostics, outputs


def tcd_loss(student, target, teacher, batch: LCDBatch, spec: LCDSpec, generators, clean_share: float = 0.0):
    """Per-sample d(f_θ(z_{t_{n+k}}, t_{n+k} → s), sg[f_θ⁻(ẑ_{t_n}, t_n → s)]) with s drawn on [0, t_n]
    (TCD arXiv:2402.19159 Alg. 3), or the clean end on a `clean_share` of the rows."""
    loss, diagnostics, _ = tcd_terms(student, target, teacher, batch, spec, generators, clean_share)
    return loss, diagnostics


def phased_sample(model, z_T, cond, w, spec: LCDSpec, phases: int):
    """PCM's deterministic M-step sampler: from z at the top timestep, one consistency jump per phase to its lower
    edge, the last to the clean end (what `--preset pcm`, DDIM trailing at M steps, reproduces)."""
    z = z_T
    tops = phase_timesteps(spec.grid, phases)
    for top, edge in zip(tops, [*tops[1:], CLEAN_END]):
        t = torch.full((len(z),), top, dtype=torch.long, device=z.device)
        z = predict_trajectory(model, z, t, torch.full_like(t, edge), cond, w, spec)
    return z
