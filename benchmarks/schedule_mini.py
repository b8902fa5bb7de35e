"""What makes an LCM-LoRA's 8 steps worse than its 4 (issue #13): the low timesteps the 8-step schedule reaches, or
the number of steps that re-noise the student's x̂₀? The same LoRA is sampled on hand-picked timestep lists from its
N = 25 grid, so the two causes come apart:

- 4 steps ending at t = 159 (999, 639, 399, 159) against LCMScheduler's own 4 (999, 759, 519, 279): the same count
  of passes, a lower last timestep;
- 8 steps that stop at t = 279 (999, 879, 799, 679, 599, 479, 399, 279) against LCMScheduler's own 8 (… 279, 159):
  the same count, never below the 4-step schedule's end;
- the same two 8-step lists under TCDScheduler at γ 0.7 (what `lcm-auto` samples 8 steps with).

    python -m benchmarks.schedule_mini [--seeds 0-2] [--n 500] [--runs runs/mini]

Each seed's LoRA is `<runs>/lcm-lora-s<seed>` (trained from `configs/mini_lcm_lora.yaml` by quality_mini's `train`
when missing). Images, prompts, seeds and the FD reference are `lcm eval`'s. Every scored seed is appended to
`results/schedule_mini.jsonl` at once; `results/schedule_mini.{json,md}` hold the per-seed rows and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

from benchmarks.quality_mini import RESULTS, ROOT, TEACHER, append_log, commit, final_weights, read_log, train
from lcm.sampling import parse_seeds

OUT = RESULTS / "schedule_mini"
# (row, preset, eta, timesteps): every list lies on the N = 25 grid (39, 79, …, 999)
SCHEDULES = [
    ("LCM, 4 steps: 999 … 279 (its own)", "lcm", None, [999, 759, 519, 279]),
    ("LCM, 4 steps ending at 159", "lcm", None, [999, 639, 399, 159]),
    ("LCM, 8 steps: 999 … 159 (its own)", "lcm", None, [999, 879, 759, 639, 519, 399, 279, 159]),
    ("LCM, 8 steps ending at 279", "lcm", None, [999, 879, 799, 679, 599, 479, 399, 279]),
    ("TCD γ 0.7, 8 steps: 999 … 159 (its own)", "tcd", 0.7, [999, 879, 759, 639, 519, 399, 279, 159]),
    ("TCD γ 0.7, 8 steps ending at 279", "tcd", 0.7, [999, 879, 799, 679, 599, 479, 399, 279]),
]


def score_seed(run_dir: Path, n: int) -> dict:
    """FD and accuracy of every schedule on one LoRA: row name → {"fd", "acc"}."""
    import torch

    from lcm.classifier import classify, digit_features, frechet_distance
    from lcm.digits import eval_prompts, load_digits_tensors
    from lcm.evaluate import sample_tensors
    from lcm.sampling import load_pipeline_for_sampling

    prompts, labels = eval_prompts(n, "train")
    real_feats = None  # the held-out digits' features, at the images' size: computed once per seed
    pipes = {}
    scores = {}
    for name, preset, eta, timesteps in SCHEDULES:
        if preset not in pipes:
            pipes[preset] = load_pipeline_for_sampling(str(TEACHER), [(str(run_dir), 1.0)], fuse=True, preset=preset,
                                                       device="cpu", dtype="fp32")
        pipe = pipes[preset]
        # the scheduler must walk exactly this list (the pipeline passes it to set_timesteps)
        kwargs = {"timesteps": timesteps} | ({"eta": eta} if eta is not None else {})
        images, _ = sample_tensors(pipe, prompts, list(range(n)), len(timesteps), 1.0, **kwargs)
        assert pipe.scheduler.timesteps.tolist() == timesteps, (name, pipe.scheduler.timesteps.tolist())
        if real_feats is None:
            real_feats = digit_features(load_digits_tensors("held_out", size=images.shape[-1])[0])
        scores[name] = {"fd": frechet_distance(digit_features(images), real_feats),
                        "acc": (classify(images) == torch.tensor(labels)).float().mean().item()}
        print(f"{run_dir.name}: {name}: FD {scores[name]['fd']:.2f}", flush=True)
    return scores


def markdown(rows: list[dict], args) -> str:
    head = (f"## Which costs at 8 steps: low timesteps or more passes? (issue #13)\n\n`python -m benchmarks."
            f"schedule_mini --seeds {args.seeds} --n {args.n}`\n\n{os.cpu_count()} CPUs, {platform.machine()}; "
            f"{args.n} eval samples per cell; commits {sorted({r['commit'] for r in rows})}. Every row samples the "
            "same LoRA of each seed (`configs/mini_lcm_lora.yaml`) on the timesteps it names.\n\n"
            "| schedule | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | median |\n|"
            + "---|" * (len(rows) + 2) + "\n")
    lines = []
    for name, *_ in SCHEDULES:
        fds = [r["scores"][name]["fd"] for r in rows]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in fds) + f" | **{statistics.median(fds):.1f}** |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-2")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each training (when one must run)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "mini"), help="folder of the lcm-lora-s<seed> runs")
    p.add_argument("--out", type=Path, default=OUT, help="writes OUT.jsonl, OUT.json, OUT.md")
    args = p.parse_args(argv)
    log = args.out.with_suffix(".jsonl")
    key = {"schedules": [s[0] for s in SCHEDULES], "n": args.n}
    done = {r["seed"]: r for r in read_log(log) if r.get("key") == key}
    for seed in parse_seeds(args.seeds):
        if seed in done:
            continue
        run_dir = Path(args.runs) / f"lcm-lora-s{seed}"
        if not (run_dir / final_weights("train_lcm_lora.py")).is_file():
            train("mini_lcm_lora", [], seed, run_dir, args.threads)
        done[seed] = {"seed": seed, "key": key, "run": str(run_dir), "commit": commit(),
                      "scores": score_seed(run_dir, args.n)}
        append_log(log, done[seed])
    rows = [done[s] for s in parse_seeds(args.seeds)]
    args.out.with_suffix(".md").write_text(markdown(rows, args))
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=2))
    print(markdown(rows, args))
    return rows


if __name__ == "__main__":
    main()
