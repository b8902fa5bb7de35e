"""Where a trained LCM-LoRA is wrong, by timestep: the measurements behind "quality falls apart at 8 steps".

    python -m benchmarks.diagnose_mini RUN [RUN ...] [--n 200] [--out benchmarks/results/diagnose_mini]

For each run (a train_lcm_lora.py folder on the mini teacher) and each t of the teacher's 25-step trailing DDIM
trajectory (CFG at the teacher's best w = 0.5, the prompts and seeds of `lcm eval`):
- **consistency error**: mean squared distance between the student's f_θ(z_t, t) and the trajectory's own endpoint x*
  (the teacher's 25-step x̂₀). A perfect consistency function gives 0 at every t; its 1-step sample is f(z_999).
- **per-timestep LCD loss**: the training loss (the run's own metric, online adapters as target) at grid index i, on
  the same latents, bucketed by t.
- the timesteps `LCMScheduler` samples at for 1/2/4/8 steps, and whether each lies on the trained grid.
The teacher's own 1-step error (its x̂₀ at z_t) is printed beside the student's as the floor a LoRA starts from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.quality_mini import RESULTS, TEACHER, commit


def trajectory(teacher, cond, uncond, w, schedule, n_steps: int, generators):
    """z_t at each trailing-DDIM timestep (descending from 999) and the 25-step endpoint x* (the last x̂₀)."""
    from diffusers.utils.torch_utils import randn_tensor

    from lcm.consistency import guided_denoiser
    from lcm.solvers import ddim_step

    denoise = guided_denoiser(teacher, cond, uncond, w, schedule, "epsilon")
    ts = [999 - i * (1000 // n_steps) for i in range(n_steps)]
    z = randn_tensor((len(generators), 4, 8, 8), generator=generators)
    points, x0 = [], None
    for i, t in enumerate(ts):
        points.append((t, z))
        t_vec = torch.full((z.shape[0],), t)
        x0, eps = denoise(z, t_vec)
        if i + 1 < len(ts):
            alpha_s, sigma_s = schedule.alpha_sigma(torch.full_like(t_vec, ts[i + 1]), z.ndim)
            z = ddim_step(x0, eps, alpha_s, sigma_s)  # to the next trailing timestep
    return points, x0


def consistency_errors(student, teacher_x0, points, x_star, cond, spec) -> list[dict]:
    """Per trajectory point: ‖f_θ(z_t, t) − x*‖² (per element) for the student, and the teacher's ‖x̂₀ − x*‖²."""
    from lcm.consistency import predict_consistency

    rows = []
    for t, z in points:
        t_vec = torch.full((z.shape[0],), t)
        f = predict_consistency(student, z, t_vec, cond, None, spec)
        rows.append({"t": t, "student": (f - x_star).pow(2).mean().item(),
                     "teacher_x0": (teacher_x0(z, t_vec) - x_star).pow(2).mean().item()})
    return rows


def loss_by_index(student, teacher, z0, cond, uncond, w, spec, generator) -> list[dict]:
    """The LCD loss (online target) at every grid index, on the same z₀ and a fixed ε per index."""
    from lcm.consistency import LCDBatch, lcd_loss

    rows = []
    for i in range(spec.grid.N):
        noise = torch.randn(z0.shape, generator=generator)
        batch = LCDBatch(z0=z0, noise=noise, index=torch.full((z0.shape[0],), i), w=w, cond=cond, uncond=uncond)
        loss, _ = lcd_loss(student, student, teacher, batch, spec)
        rows.append({"index": i, "t": int(spec.grid.timesteps[i]), "loss": loss.mean().item()})
    return rows


@torch.no_grad()
def diagnose(run: Path, n: int) -> dict:
    from diffusers import DiffusionPipeline

    from lcm.consistency import LCDSpec
    from lcm.data import add_time_ids
    from lcm.digits import eval_prompts, load_digits_tensors
    from lcm.encode import encode_text, latent_moments
    from lcm.models import noise_schedule_of
    from lcm.roles import base_role, denoiser_role
    from lcm.parameterization import to_x0_eps
    from lcm.schedule import SolverGrid, lcm_inference_timesteps
    from lcm.lora import load_pipeline_lora
    from lcm.sampling import resolve_lora_dir

    cfg = json.loads((run / "final" / "scheduler" / "scheduler_config.json").read_text())
    N = int(cfg["original_inference_steps"])
    pipe = DiffusionPipeline.from_pretrained(str(TEACHER))
    load_pipeline_lora(pipe, resolve_lora_dir(str(run)), "student")  # refused unless every tensor lands
    schedule = noise_schedule_of(pipe.scheduler)
    spec = LCDSpec(schedule=schedule, grid=SolverGrid(1000, N))
    prompts, labels = eval_prompts(n)
    size = torch.tensor([[16, 16]] * n)
    cond, uncond = encode_text(pipe, prompts, add_time_ids(size, torch.zeros(n, 2), size), "cpu")
    student, teacher = denoiser_role(pipe.unet), base_role(pipe.unet)
    w = torch.full((n,), 0.5)

    def teacher_x0(z, t):
        alpha, sigma = schedule.alpha_sigma(t, z.ndim)
        return to_x0_eps(teacher(z, t, cond), z, alpha, sigma, "epsilon")[0]

    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    points, x_star = trajectory(teacher, cond, uncond, w, schedule, 25, gens)
    errors = consistency_errors(student, teacher_x0, points, x_star, cond, spec)
    real, real_labels = load_digits_tensors("train", size=16)
    pick = torch.cat([torch.nonzero(real_labels == d)[:1] for d in labels]).flatten()  # a real digit per prompt
    mu, _ = latent_moments(pipe.vae, real[pick])
    losses = loss_by_index(student, teacher, mu, cond, uncond, w, spec, torch.Generator().manual_seed(0))
    on_grid = {k: [t in set(SolverGrid(1000, N).timesteps.tolist()) for t in lcm_inference_timesteps(k, N)]
               for k in (1, 2, 4, 8)}
    return {"run": str(run), "N": N, "consistency_error": errors, "loss_by_index": losses,
            "lcm_timesteps": {k: lcm_inference_timesteps(k, N) for k in (1, 2, 4, 8)}, "on_grid": on_grid}


def buckets(rows: list[dict], key: str, edges=(0, 100, 200, 400, 600, 800, 1000)) -> list[tuple[str, float]]:
    out = []
    for lo, hi in zip(edges, edges[1:]):
        vals = [r[key] for r in rows if lo <= r["t"] < hi]
        if vals:
            out.append((f"{lo}–{hi - 1}", sum(vals) / len(vals)))
    return out


def markdown(results: list[dict], n: int) -> str:
    lines = ["## Per-timestep diagnosis of LCM-LoRA runs on the mini teacher", "",
             f"`python -m benchmarks.diagnose_mini RUN ...`; {n} prompts (lcm eval's), commit {commit()}.", "",
             "Consistency error ‖f_θ(z_t, t) − x*‖² along the teacher's 25-step DDIM trajectory (w = 0.5), by t:", "",
             "| t | teacher x̂₀ | " + " | ".join(Path(r["run"]).name for r in results) + " |",
             "|---|---|" + "---|" * len(results)]
    for j, row in enumerate(results[0]["consistency_error"]):
        lines.append(f"| {row['t']} | {row['teacher_x0']:.4f} | "
                     + " | ".join(f"{r['consistency_error'][j]['student']:.4f}" for r in results) + " |")
    lines += ["", "LCD training loss (online target, the run's metric) by t bucket:", "",
              "| t | " + " | ".join(Path(r["run"]).name for r in results) + " |", "|---|" + "---|" * len(results)]
    per = [buckets(r["loss_by_index"], "loss") for r in results]
    for j, (label, _) in enumerate(per[0]):
        lines.append(f"| {label} | " + " | ".join(f"{p[j][1]:.5f}" for p in per) + " |")
    r0 = results[0]
    lines += ["", "LCMScheduler timesteps (all on the trained grid: "
              f"{all(all(v) for v in r0['on_grid'].values())}): "
              + "; ".join(f"{k} steps {v}" for k, v in r0["lcm_timesteps"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out", type=Path, default=RESULTS / "diagnose_mini")
    args = p.parse_args(argv)
    results = [diagnose(run, args.n) for run in args.runs]
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results, args.n))
    print(args.out.with_suffix(".md").read_text())
    return results


if __name__ == "__main__":
    main()
