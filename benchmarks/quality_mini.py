"""Few-step quality of the LCM-LoRA preset on the mini teacher over several training seeds: the source of README's
quality table (median and min–max over seeds, per step count).

    python -m benchmarks.quality_mini [--seeds 0-4] [--threads 2] [--n 500] [override ...]

Each seed trains `configs/mini_lcm_lora.yaml` (plus any dotted overrides) from scratch in a fresh process with
`train.seed=S`, then every run is scored by `lcm eval`'s own `evaluate` (same prompts, seeds and FD reference as
`lcm eval`). Every finished run is appended to `<out>.jsonl` as soon as it is scored, so a stopped benchmark loses
nothing: a rerun skips (seed, overrides) pairs whose rows are already there and whose run folder still holds the LoRA.
The teacher's DDIM rows are scored once per log. `<out>.md` / `<out>.json` show the cell just run, then every other
cell the log holds (at the same eval size and step counts). `benchmarks/sweep_mini.py` drives the same functions per
sweep cell.
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


def train(config: str, overrides: list[str], seed: int, run_dir: Path, threads: int,
          script: str = "train_lcm_lora.py") -> float:
    """Train one run from scratch (`script`: train_lcm_lora.py or train_lcd.py) in a fresh process with `threads`
    torch threads; returns its wall seconds."""
    if run_dir.exists():  # a half-written run from a stopped benchmark: start it again, never resume a different cell
        import shutil

        shutil.rmtree(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(ROOT / script), "--config", config, f"data.path={ensure_digits()}",
           f"model.pretrained={TEACHER}", f"train.seed={seed}", f"train.output_dir={run_dir}",
           "train.report_to=none", *overrides]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(f"{run_dir}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


DIVERSITY_REF_STEPS = 25  # issue #16: 1-step diversity ≥ 80% of the teacher's at 25 DDIM steps (mode collapse check)
HELDOUT_STEPS = (2, 4)  # the held-out column (issue #13 item 5): prompts from templates no training caption uses


def score(lora_dir, out_dir: Path, n: int, steps: list[int], methods=("LCM-LoRA",),
          original_inference_steps: int = 50) -> dict:
    """`lcm eval`'s evaluate on one run (or the teacher, methods=("DDIM",)): {steps: {"fd": …, "acc": …}} on the
    training caption templates, plus {"heldout": {steps: …}} at HELDOUT_STEPS on the held-out templates. With
    methods=("LCD",), `lora_dir` is a whole-network (train_lcd.py) run, scored as `lcm eval --lcd` scores it."""
    from lcm.evaluate import evaluate

    # teacher_w = 0.5 (guidance_scale 1.5) is the mini teacher's best FD and `lcm eval`'s default; evaluate()'s own
    # default differs, so it is passed explicitly.
    common = dict(teacher_extra_steps=(), teacher_w=0.5, methods=list(methods),
                  original_inference_steps=original_inference_steps)
    whole = tuple(methods) == ("LCD",)
    lora = str(lora_dir) if lora_dir and not whole else None
    common["lcd"] = str(lora_dir) if whole else None
    rows = evaluate(str(TEACHER), lora, out_dir, n=n, steps=steps, **common)
    held = evaluate(str(TEACHER), lora, Path(out_dir) / "heldout", n=n, steps=HELDOUT_STEPS, prompt_sets=("heldout",),
                    **common)
    scores = scores_by_steps(rows)
    scores["heldout"] = {str(r.steps): {"fd": r.frechet, "acc": r.accuracy} for r in held}
    return scores


def scores_by_steps(rows) -> dict:
    """`evaluate`'s rows as {steps: {"fd", "acc", "div"}}, the form every benchmark log stores."""
    return {str(r.steps): {"fd": r.frechet, "acc": r.accuracy, "div": r.diversity} for r in rows}


def final_weights(script: str) -> Path:
    """The file inside a run folder that says the run finished: a LoRA run's weights, or a whole-network run's UNet."""
    return Path("final") / ("unet/config.json" if script == "train_lcd.py" else "pytorch_lora_weights.safetensors")


def run_cell(name: str, config: str, overrides: list[str], seeds: list[int], log: Path, runs: Path, n: int,
             steps: list[int], threads: int, script: str = "train_lcm_lora.py") -> list[dict]:
    """Train + score every seed of one cell that the log does not already hold; returns all of the cell's rows.
    `script` train_lcd.py makes it a whole-network cell (the run's UNet scored as `lcm eval --lcd` does)."""
    key = cell_key(config, overrides)
    whole = script == "train_lcd.py"
    weights = final_weights(script)
    done = {r["seed"]: r for r in read_log(log) if r.get("key") == key and r["n"] == n and "heldout" in r["scores"]}
    for seed in seeds:
        if seed in done:
            continue
        run_dir = runs / f"{name}-s{seed}"
        # A run folder that already holds its final weights (e.g. started by hand under this cell's name) is scored as is.
        adopted = (run_dir / weights).is_file()
        trained_at = None if adopted else commit()  # the tree it trains from (the row is written after the eval)
        secs = None if adopted else train(config, overrides, seed, run_dir, threads, script)
        n_steps = _trained_grid(run_dir)
        row = {"cell": name, "key": key, "config": config, "overrides": overrides, "seed": seed, "n": n,
               "train_s": secs and round(secs, 1), "threads": threads, "load": round(os.getloadavg()[0], 2),
               "commit": trained_at, "scores": score(run_dir, run_dir / "eval", n, steps,
                                                   methods=("LCD",) if whole else ("LCM-LoRA",),
                                                   original_inference_steps=n_steps)}
        if whole:
            row["script"] = script
        append_log(log, row)
        done[seed] = row
        print(f"{name} seed {seed}: " + "  ".join(f"{k}-step FD {v['fd']:.1f}" for k, v in row["scores"].items() if k != "heldout")
              + "  held-out " + "  ".join(f"{k}-step FD {v['fd']:.1f}" for k, v in row["scores"]["heldout"].items()),
              flush=True)
    return [done[s] for s in seeds]


def _trained_grid(run_dir: Path) -> int:
    """N the run trained on, from the scheduler config it exported (what `lcm sample` will use); an ADD run exports
    Euler ancestral, which has no grid (its eval row uses that scheduler), so it gets the default."""
    cfg = json.loads((run_dir / "final" / "scheduler" / "scheduler_config.json").read_text())
    return int(cfg.get("original_inference_steps", 50))


def teacher_rows(log: Path, n: int, steps: list[int], out: Path) -> dict:
    """The teacher's DDIM scores at the same step counts, computed once per log."""
    want = sorted({*steps, DIVERSITY_REF_STEPS})
    for r in read_log(log):
        if (r.get("cell") == "teacher DDIM" and r["n"] == n and set(map(str, want)) <= set(r["scores"])
                and "heldout" in r["scores"]):
            return r["scores"]
    scores = score(None, out / "teacher-eval", n, want, methods=("DDIM",))
    append_log(log, {"cell": "teacher DDIM", "key": "teacher", "n": n, "commit": commit(), "scores": scores})
    return scores


def _stats(values: list[dict]) -> dict:
    fds, accs = [v["fd"] for v in values], [v["acc"] for v in values]
    return {"fd_median": statistics.median(fds), "fd_min": min(fds), "fd_max": max(fds),
            "acc_median": statistics.median(accs), "acc_min": min(accs)}


def summarize(rows: list[dict], steps: list[int], teacher: dict | None = None) -> dict:
    """Per step count: median and min–max of FD and accuracy over the rows (seeds); under "heldout", the same at
    HELDOUT_STEPS on the held-out templates, with each seed's accuracy as a fraction of the teacher's (target ≥ 0.9)."""
    out = {str(k): _stats([r["scores"][str(k)] for r in rows]) for k in steps}
    held = {}
    for k in map(str, HELDOUT_STEPS):
        held[k] = _stats([r["scores"]["heldout"][k] for r in rows])
        if teacher is not None:
            ratios = [r["scores"]["heldout"][k]["acc"] / teacher["heldout"][k]["acc"] for r in rows]
            held[k].update(acc_ratio_min=min(ratios), acc_ratio_median=statistics.median(ratios))
    out["heldout"] = held
    return out


def targets(summary: dict, rows: list[dict], teacher: dict | None = None) -> list[tuple[str, bool, str]]:
    """Issue #13's quality targets (and #16's diversity check, given the teacher's rows) against this summary, for
    the step counts it holds: (target, met, measured)."""
    out = [(f"{k} step{'s' * (k != '1')}: median FD ≤ {limit}", summary[k]["fd_median"] <= limit,
            f"{summary[k]['fd_median']:.1f}") for k, limit in (("1", 100), ("2", 45.6), ("4", 35)) if k in summary]
    if "4" in summary:
        spread = summary["4"]["fd_max"] - summary["4"]["fd_min"]
        out.append(("4-step spread (max − min) ≤ 6 FD", spread <= 6, f"{spread:.1f}"))
    if "4" in summary and "8" in summary:
        worst = max(r["scores"]["8"]["fd"] / r["scores"]["4"]["fd"] for r in rows)
        out.append(("8 steps ≤ 4 steps + 10% on every seed", worst <= 1.1, f"worst seed: 8-step FD = {worst:.2f} × 4-step"))
    ref = (teacher or {}).get(str(DIVERSITY_REF_STEPS), {}).get("div")
    if "1" in summary and ref and all("div" in r["scores"]["1"] for r in rows):
        worst = min(r["scores"]["1"]["div"] for r in rows) / ref
        out.append((f"1-step diversity ≥ 80% of the teacher's {DIVERSITY_REF_STEPS}-step ({ref:.1f}) on every seed",
                    worst >= 0.8, f"worst seed {worst:.0%}"))
    for k, v in summary.get("heldout", {}).items():
        if "acc_ratio_min" in v:
            out.append((f"held-out {k} steps: accuracy ≥ 90% of the teacher's on every seed", v["acc_ratio_min"] >= 0.9,
                        f"worst seed {v['acc_ratio_min']:.1%}"))
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
    med = lambda v: f"**{v['fd_median']:.1f}** ({v['fd_min']:.1f}–{v['fd_max']:.1f}) / {v['acc_median']:.1%}"  # noqa: E731
    s = summarize(rows, steps, teacher)
    lines.append(f"| **median of {len(rows)} seeds** (min–max) | " + " | ".join(med(s[str(k)]) for k in steps) + " |")
    if "1" in map(str, steps) and str(DIVERSITY_REF_STEPS) in teacher and "div" in teacher["1"]:
        ref = teacher[str(DIVERSITY_REF_STEPS)]
        lines += ["", "Diversity at 1 step (mean pairwise classifier-feature distance within each prompted digit): "
                  f"teacher DDIM {teacher['1']['div']:.1f}, and {ref['div']:.1f} at {DIVERSITY_REF_STEPS} steps (FD "
                  f"{ref['fd']:.1f}); per seed " + ", ".join(f"{r['seed']}: {r['scores']['1'].get('div', float('nan')):.1f}"
                                                         for r in rows) + "."]
    lines += ["", "Held-out prompts (caption templates that neither the teacher nor any student trained on):", "",
              "| run | " + " | ".join(f"{k} steps FD / acc" for k in HELDOUT_STEPS) + " |",
              "|---|" + "---|" * len(HELDOUT_STEPS)]
    lines.append("| teacher DDIM (w = 0.5) | " + " | ".join(cell(teacher["heldout"][str(k)]) for k in HELDOUT_STEPS)
                 + " |")
    for r in rows:
        lines.append(f"| seed {r['seed']} | " + " | ".join(cell(r["scores"]["heldout"][str(k)]) for k in HELDOUT_STEPS)
                     + " |")
    lines.append(f"| **median of {len(rows)} seeds** (min–max) | "
                 + " | ".join(med(s["heldout"][str(k)]) for k in HELDOUT_STEPS) + " |")
    lines += ["", "| target (issues #13, #16) | met | measured |", "|---|---|---|"]
    lines += [f"| {t} | {'yes' if ok else '**no**'} | {m} |" for t, ok, m in targets(s, rows, teacher)]
    return "\n".join(lines) + "\n"


def logged_cells(log: Path, n: int, steps: list[int]) -> list[dict]:
    """Every cell of the log scored at `n` eval samples on all of `steps` (and the held-out prompts), in the order
    the log first holds them: {"name", "key", "config", "overrides", "rows"}, one row per seed (the last one logged)."""
    cells: dict[str, dict] = {}
    for r in read_log(log):
        if r.get("key") in (None, "teacher") or r.get("n") != n or "heldout" not in r["scores"]:
            continue
        if not all(str(k) in r["scores"] for k in steps):
            continue
        c = cells.setdefault(r["key"], {"name": r["cell"], "key": r["key"], "config": r["config"],
                                        "overrides": r["overrides"], "seeds": {}})
        c["seeds"][r["seed"]] = r
    return [{**{k: v for k, v in c.items() if k != "seeds"}, "rows": [c["seeds"][s] for s in sorted(c["seeds"])]}
            for c in cells.values()]


def logged_meta(cell: dict, out: Path, n: int) -> dict:
    """The header of a cell's table rebuilt from its logged rows (a cell run by an earlier invocation)."""
    rows = cell["rows"]
    seeds = ",".join(str(r["seed"]) for r in rows)
    threads = sorted({r.get("threads") for r in rows if r.get("threads")})
    command = (f"python -m benchmarks.quality_mini --seeds {seeds} --threads {threads[-1] if threads else 2} --out "
               f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} --config {cell['config']} --name "
               f"{cell['name']} " + " ".join(cell["overrides"])).strip()
    walls = [r["train_s"] for r in rows if r.get("train_s")]
    return {"command": command, "platform": "rows as logged (load: the highest seed's)",
            "threads": "/".join(map(str, threads)) or "?", "load": max((r.get("load") or 0) for r in rows), "n": n,
            "wall_s": sum(walls),
            "commit": ", ".join(dict.fromkeys(str(r.get("commit")) for r in rows))}


def main(argv=None) -> dict:
    from lcm.sampling import parse_seeds

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-4", help="training seeds, e.g. 0-4 or 0,3,7")
    p.add_argument("--threads", type=int, default=2, help="torch threads per training run")
    p.add_argument("--n", type=int, default=500, help="eval samples per cell (lcm eval --n)")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--config", default="mini_lcm_lora")
    p.add_argument("--script", default="train_lcm_lora.py", choices=("train_lcm_lora.py", "train_lcd.py"),
                   help="train_lcd.py: a whole-network cell (e.g. --config mini_lcd), scored as `lcm eval --lcd`")
    p.add_argument("--name", default="preset", help="run-name prefix under --runs")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality_mini")
    p.add_argument("--out", type=Path, default=RESULTS / "quality_mini", help="writes OUT.json, OUT.md, OUT.jsonl")
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied to every seed")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    start, log = time.perf_counter(), args.out.with_suffix(".jsonl")
    teacher = teacher_rows(log, args.n, steps, args.runs)
    rows = run_cell(args.name, args.config, args.overrides, parse_seeds(args.seeds), log, args.runs, args.n, steps,
                    args.threads, args.script)
    meta = {"command": "python -m benchmarks.quality_mini " + " ".join(argv if argv is not None else sys.argv[1:]),
            "platform": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
            "threads": args.threads, "load": round(os.getloadavg()[0], 2), "n": args.n,
            "wall_s": time.perf_counter() - start, "commit": commit()}
    # OUT.md / OUT.json: this cell first, then every other cell the log holds, so a later cell never hides an earlier one
    key = cell_key(args.config, args.overrides)
    others = [c for c in logged_cells(log, args.n, steps) if c["key"] != key]
    result = {"meta": meta, "teacher_ddim": teacher, "rows": rows, "summary": summarize(rows, steps, teacher),
              "other_cells": [{**c, "summary": summarize(c["rows"], steps, teacher)} for c in others]}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    kind = "Whole-network" if args.script == "train_lcd.py" else "LoRA"
    text = markdown(f"{kind} preset `{args.config}` {' '.join(args.overrides)}", rows, teacher, steps, meta)
    if others:
        text += f"\n# Every other cell in `{log.name}` (rows as logged; the wall is the sum of the seeds' training)\n"
        text += "".join("\n" + markdown(f"`{c['name']}`: `{c['config']}` {' '.join(c['overrides'])}", c["rows"],
                                        teacher, steps, logged_meta(c, args.out, args.n)) for c in others)
    args.out.with_suffix(".md").write_text(text)
    print(args.out.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
