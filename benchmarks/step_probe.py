"""A quick probe of whole-step speed levers on the mini LoRA preset: one process per variant, the first step (which
holds torch.compile's compilation) reported apart from the median of the steps after it.

    OMP_NUM_THREADS=1 python -m benchmarks.step_probe [--steps 8] [VARIANT ...]

Variants: base (latent cache, today's default otherwise), channels_last, compile (train.torch_compile over the whole
trained network, so student, teacher and target calls all run compiled). Each step is `train_speed.build_preset_step`
(batch 64, rank 32, EMA target, on `lcm cache` latents), exactly as the training loop runs it. This is a probe, not
the harness: one process per variant, on whatever else the machine is doing; run it on a quiet machine. Writes
benchmarks/results/step_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {"base": [], "channels_last": ["train.channels_last=true"], "compile": ["train.torch_compile=true"]}


def probe(overrides: list[str], steps: int) -> dict:
    """Build the preset step with `overrides` in this process and time `steps` calls."""
    from benchmarks.train_speed import _latent_cache, build_preset_step

    start = time.perf_counter()
    step = build_preset_step("mini_lcm_lora", 64, ("distill.ema_decay=0.95", f"data.cache_dir={_latent_cache([])}",
                                                   *overrides))
    build = time.perf_counter() - start
    times = [step() for _ in range(steps)]
    return {"build_s": build, "first_s": times[0], "times": times, "median_after_first_s": statistics.median(times[1:])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one variant, in its own process
        print(json.dumps(probe(VARIANTS[args.child], args.steps)))
        return {}
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; valid: {list(VARIANTS)}")
    rows = {}
    for name in args.variants or list(VARIANTS):
        out = subprocess.run([sys.executable, "-m", "benchmarks.step_probe", "--child", name, "--steps", str(args.steps)],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name}: first step {rows[name]['first_s']:.1f} s, then median {rows[name]['median_after_first_s']:.3f} s",
              flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = {"threads": os.environ.get("OMP_NUM_THREADS"), "load_end": os.getloadavg()[0], "commit": commit.strip(),
              "steps": args.steps, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_probe.json").write_text(json.dumps(report, indent=1))
    base = rows.get("base", {}).get("median_after_first_s")
    lines = ["## Whole-step speed levers, mini LoRA preset on cached latents (probe)", "",
             f"`OMP_NUM_THREADS={report['threads']} python -m benchmarks.step_probe --steps {args.steps}`", "",
             f"commit {report['commit']}, load average at the end {report['load_end']:.2f}; one process per variant.", "",
             "| variant | first step s | median of the other steps s | base / variant |", "|---|---|---|---|"]
    for name, r in rows.items():
        ratio = f"{base / r['median_after_first_s']:.2f}" if base else "—"
        lines.append(f"| {name} | {r['first_s']:.1f} | {r['median_after_first_s']:.3f} | {ratio} |")
    (RESULTS / "step_probe.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
