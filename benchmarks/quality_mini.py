"""Few-step quality of the LCM-LoRA preset on the mini teacher over several training seeds: the source of README's
quality table (median and min–max over seeds, per step count).

    python -m benchmarks.quality_mini [--seeds 0-4] [--threads 2] [--n 500] [override ...]

Each seed trains `configs/mini_lcm_lora.yaml` (plus any dotted overrides) from scratch in a fresh process with
`train.seed=S`, then every run is scored by `lcm eval`'s own `evaluate` (same prompts, seeds and FD reference as
`lcm eval`). Every finished run is appended to `<out>.jsonl` as soon as it is scored, so a stopped benchmark loses
nothing: a rerun skips (seed, overrides) pairs whose rows are already there and whose run folder still holds the LoRA.
The teacher's DDIM rows are scored once per log. `benchmarks/sweep_mini.py` drives the same functions per sweep cell.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEACHER = ROOT / "lcm" / "assets" / "mini_teacher"
DIGITS = ROOT / "runs" / "mini" / "digits"


def commit() -> str:
    """The commit the numbers are measured at, with '+dirty' when the tree has uncommitted changes to tracked files."""
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True).stdout
    return sha + ("+dirty" if dirty.strip() else "")


def cell_key(config: str, overrides: list[str]) -> str:
    """A short stable id of (preset, overrides) without the seed: runs of one cell share it."""
    return hashlib.sha1(json.dumps([config, sorted(overrides)]).encode()).hexdigest()[:10]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def append_log(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def ensure_digits() -> Path:
    if not (DIGITS / "metadata.jsonl").is_file():
        from lcm.digits import export_digits_folder

        export_digits_folder(DIGITS)
    return DIGITS


def train(config: str, overrides: list[str], seed: int, run_dir: Path, threads: int) -> float:
    """Train one run from scratch in a fresh process with `threads` torch threads; returns its wall seconds."""
    if run_dir.exists():  # a half-written run from a stopped benchmark: start it again, never resume a different cell
        import shutil

        shutil.rmtree(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(ROOT / "train_lcm_lora.py"), "--config", config, f"data.path={ensure_digits()}",
           f"model.pretrained={TEACHER}", f"train.seed={seed}", f"train.output_dir={run_dir}",
           "train.report_to=none", *overrides]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(f"{run_dir}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def score(lora_dir, out_dir: Path, n: int, steps: list[int], methods=("LCM-LoRA",),
          original_inference_steps: int = 50) -> dict:
    """`lcm eval`'s evaluate on one run (or the teacher, methods=("DDIM",)): {steps: {"fd": …, "acc": …}}."""
    from lcm.evaluate import evaluate

    # teacher_w = 0.5 (guidance_scale 1.5) is the mini teacher's best FD and `lcm eval`'s default; evaluate()'s own
    # default differs, so it is passed explicitly.
    rows = evaluate(str(TEACHER), str(lora_dir) if lora_dir else None, out_dir, n=n, steps=steps,
                    teacher_extra_steps=(), teacher_w=0.5, methods=list(methods),
                    original_inference_steps=original_inference_steps)
    return {str(r.steps): {"fd": r.frechet, "acc": r.accuracy} for r in rows}


def run_cell(name: str, config: str, overrides: list[str], seeds: list[int], log: Path, runs: Path, n: int,
             steps: list[int], threads: int) -> list[dict]:
    """Train + score every seed of one cell that the log does not already hold; returns all of the cell's rows."""
    key = cell_key(config, overrides)
    done = {r["seed"]: r for r in read_log(log) if r.get("key") == key and r["n"] == n}
    for seed in seeds:
        if seed in done:
            continue
        run_dir = runs / f"{name}-s{seed}"
        # A run folder that already holds its final LoRA (e.g. started by hand under this cell's name) is scored as it is.
        adopted = (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
        secs = None if adopted else train(config, overrides, seed, run_dir, threads)
        n_steps = _trained_grid(run_dir)
        row = {"cell": name, "key": key, "config": config, "overrides": overrides, "seed": seed, "n": n,
               "train_s": secs and round(secs, 1), "threads": threads, "load": round(os.getloadavg()[0], 2),
               "commit": commit(), "scores": score(run_dir, run_dir / "eval", n, steps,
                                                   original_inference_steps=n_steps)}
        append_log(log, row)
        done[seed] = row
        print(f"{name} seed {seed}: " + "  ".join(f"{k}-step FD {v['fd']:.1f}" for k, v in row["scores"].items()),
              flush=True)
    return [done[s] for s in seeds]


def _trained_grid(run_dir: Path) -> int:
    """N the run trained on, from the scheduler config it exported (what `lcm sample` will use)."""
    cfg = json.loads((run_dir / "final" / "scheduler" / "scheduler_config.json").read_text())
    return int(cfg["original_inference_steps"])


def teacher_rows(log: Path, n: int, steps: list[int], out: Path) -> dict:
    """The teacher's DDIM scores at the same step counts, computed once per log."""
    for r in read_log(log):
        if r.get("cell") == "teacher DDIM" and r["n"] == n and set(map(str, steps)) <= set(r["scores"]):
            return r["scores"]
    scores = score(None, out / "teacher-eval", n, steps, methods=("DDIM",))
    append_log(log, {"cell": "teacher DDIM", "key": "teacher", "n": n, "commit": commit(), "scores": scores})
    return scores


def summarize(rows: list[dict], steps: list[int]) -> dict:
    """Per step count: median and min–max of FD and accuracy over the rows (seeds)."""
    out = {}
    for k in map(str, steps):
        fds = [r["scores"][k]["fd"] for r in rows]
        accs = [r["scores"][k]["acc"] for r in rows]
        out[k] = {"fd_median": statistics.median(fds), "fd_min": min(fds), "fd_max": max(fds),
                  "acc_median": statistics.median(accs)}
    return out


def markdown(title: str, rows: list[dict], teacher: dict, steps: list[int], meta: dict) -> str:
    """Per-seed rows, the teacher's DDIM row and the median / min–max line, as markdown."""
    head = "| run | " + " | ".join(f"{k} step{'s' * (k > 1)} FD / acc" for k in steps) + " |"
    lines = [f"## {title}", "", f"`{meta['command']}`", "",
             f"{meta['platform']}; {meta['threads']} torch thread(s) per training; load average at the end "
             f"{meta['load']}; {meta['n']} eval samples per cell; wall {meta['wall_s']:.0f} s; commit {meta['commit']}.",
             "", head, "|---|" + "---|" * len(steps)]
    cell = lambda v: f"{v['fd']:.1f} / {v['acc']:.1%}"  # noqa: E731
    lines.append("| teacher DDIM (w = 0.5) | " + " | ".join(cell(teacher[str(k)]) for k in steps) + " |")
    for r in rows:
        wall = f" ({r['train_s']:.0f} s)" if r["train_s"] else ""
        lines.append(f"| seed {r['seed']}{wall} | " +
                     " | ".join(cell(r["scores"][str(k)]) for k in steps) + " |")
    s = summarize(rows, steps)
    lines.append(f"| **median of {len(rows)} seeds** (min–max) | " + " | ".join(
        f"**{s[str(k)]['fd_median']:.1f}** ({s[str(k)]['fd_min']:.1f}–{s[str(k)]['fd_max']:.1f}) / "
        f"{s[str(k)]['acc_median']:.1%}" for k in steps) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from lcm.sampling import parse_seeds

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-4", help="training seeds, e.g. 0-4 or 0,3,7")
    p.add_argument("--threads", type=int, default=2, help="torch threads per training run")
    p.add_argument("--n", type=int, default=500, help="eval samples per cell (lcm eval --n)")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--config", default="mini_lcm_lora")
    p.add_argument("--name", default="preset", help="run-name prefix under --runs")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality_mini")
    p.add_argument("--out", type=Path, default=RESULTS / "quality_mini", help="writes OUT.json, OUT.md, OUT.jsonl")
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied to every seed")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    start, log = time.perf_counter(), args.out.with_suffix(".jsonl")
    teacher = teacher_rows(log, args.n, steps, args.runs)
    rows = run_cell(args.name, args.config, args.overrides, parse_seeds(args.seeds), log, args.runs, args.n, steps,
                    args.threads)
    meta = {"command": "python -m benchmarks.quality_mini " + " ".join(argv if argv is not None else sys.argv[1:]),
            "platform": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
            "threads": args.threads, "load": round(os.getloadavg()[0], 2), "n": args.n,
            "wall_s": time.perf_counter() - start, "commit": commit()}
    result = {"meta": meta, "teacher_ddim": teacher, "rows": rows, "summary": summarize(rows, steps)}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(f"LCM-LoRA `{args.config}` {' '.join(args.overrides)}", rows,
                                                    teacher, steps, meta))
    print(args.out.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
