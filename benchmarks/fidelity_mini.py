"""Is the 8-step LoRA worse, or closer to its teacher? (issue #13 item 2.) FD of samples against the teacher's own
converged samples, beside FD against real digits.

    python -m benchmarks.fidelity_mini RUN [RUN ...] [--n 500] [--reference-steps 25]

A consistency student distils the teacher's ODE: with more steps it should approach the teacher's distribution, and
the teacher (25-step DDIM, w = 0.5) is itself 41.9 FD from real digits. So a student whose 2–4-step samples are
*better* than the teacher's (FD ≈ 35) can get worse against real digits at 8 steps while getting closer to what it was
taught. This measures both, on `lcm eval`'s prompts and seeds: FD(student k steps, teacher reference) and
FD(student k steps, real held-out digits), for the teacher's DDIM at k steps as well.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.quality_mini import RESULTS, TEACHER, _trained_grid, commit


def fidelity(runs: list[Path], n: int, steps: list[int], reference_steps: int) -> dict:
    import torch
    from diffusers import DiffusionPipeline

    from lcm.classifier import digit_features, frechet_distance
    from lcm.digits import eval_prompts, load_digits_tensors
    from lcm.evaluate import TEACHER_SOLVERS, _fused_student, sample_tensors
    from lcm.guidance import guidance_scale_from_w
    from lcm.sampling import lcm_scheduler_for

    pipe = DiffusionPipeline.from_pretrained(TEACHER)
    pipe.set_progress_bar_config(disable=True)
    prompts, _ = eval_prompts(n, "train")
    seeds = list(range(n))
    real, _ = load_digits_tensors("held_out", size=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    real_feats = digit_features(real)
    base = pipe.scheduler.config
    g = guidance_scale_from_w(0.5)
    pipe.scheduler = TEACHER_SOLVERS["DDIM"](base)
    ref_feats = digit_features(sample_tensors(pipe, prompts, seeds, reference_steps, g)[0])

    def row(k, guidance):
        feats = digit_features(sample_tensors(pipe, prompts, seeds, k, guidance)[0])
        return {"fd_teacher": frechet_distance(feats, ref_feats), "fd_real": frechet_distance(feats, real_feats)}

    out = {"reference": f"teacher DDIM {reference_steps} steps, w = 0.5",
           "reference_fd_real": frechet_distance(ref_feats, real_feats), "n": n, "commit": commit(), "rows": {}}
    out["rows"]["teacher DDIM"] = {str(k): row(k, g) for k in steps}
    for run in runs:
        with _fused_student(pipe, run / "final"):
            pipe.scheduler = lcm_scheduler_for(base, _trained_grid(run))
            out["rows"][run.name] = {str(k): row(k, 1.0) for k in steps}
        print(run.name, out["rows"][run.name], flush=True)
    return out


def markdown(result: dict, steps: list[int]) -> str:
    lines = [f"## FD against the teacher's own samples ({result['reference']}) and against real digits", "",
             f"{result['n']} samples per cell, `lcm eval`'s prompts and seeds; commit {result['commit']}. The "
             f"reference itself is {result['reference_fd_real']:.1f} FD from real digits.", "",
             "| run | " + " | ".join(f"{k} step{'s' * (k > 1)}: to teacher / to real" for k in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for name, cells in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{cells[str(k)]['fd_teacher']:.1f} / {cells[str(k)]['fd_real']:.1f}"
                                                for k in steps) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="train_lcm_lora.py run folders on the mini teacher")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--reference-steps", type=int, default=25)
    p.add_argument("--out", type=Path, default=RESULTS / "fidelity_mini")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    result = fidelity(args.runs, args.n, steps, args.reference_steps)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result, steps))
    print(args.out.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
