"""One trained LCM-LoRA, several samplers: LCMScheduler (LCM's multistep sampler, which re-noises x̂₀ fully at every
step) against TCDScheduler at gammas γ < 1 on the same LoRA and the same grid (TCD's strategic stochastic sampling:
jump along the trajectory to s = (1 − γ)·t_next, then re-noise only to t_next). Issue #13's 8-step question: does the
8-step collapse come from the student or from how it is sampled?

    python -m benchmarks.sampler_mini [--seeds 0-2] [--gammas 0.3,0.5,0.7] [--steps 1,2,4,8] [--threads 1]
        [--n 500] [--auto] [--spread] [--out PATH] [--config mini_lcm_lora --script train_lcm_lora.py --name lcm-lora]
        [key=value …]

Each seed's run is `<runs>/<name>-s<seed>` (default `lcm-lora`; trained from `--config`, default
`configs/mini_lcm_lora.yaml`, with the overrides and `train.seed=S` by `--script` when the folder holds no student yet, by
benchmarks/quality_mini.py's `train`; `--config mini_lcd --script train_lcd.py --name lcd` scores the whole-UNet LCD
runs quality_mini made), scored by `lcm eval`'s `evaluate` with one
`--student NAME=RUN[:tcd@γ]` row per sampler. Every scored seed is appended to `OUT.jsonl` (default
`results/sampler_mini`) at once, so a stopped benchmark loses nothing; `OUT.{json,md}` hold per-seed rows, the median
and min–max per
cell, and the 8-step / 4-step ratio of every seed (the target: ≤ 1.1 on every seed).
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

def samplers(gammas: list[float], auto: bool = False, spread: bool = False) -> list[tuple[str, str | None]]:
    """(row name, preset spec) per sampler: LCMScheduler on the run's grid (the `lcm` preset: for an LCM run the same
    scheduler it saved, for a TCD run not its own), then TCD at each gamma, then (`spread`) TCD at each gamma on
    timesteps spread over the whole grid (the `tcd-spread` preset), then (`auto`) the `lcm-auto` preset, which
    picks one of those by step count (what `lcm sample` gives an LCM-LoRA run)."""
    return ([(row_name("lcm"), "lcm")] + [(row_name("tcd", g), f"tcd@{g:g}") for g in gammas]
            + [(row_name("tcd-spread", g), f"tcd-spread@{g:g}") for g in gammas if spread]
            + ([("lcm-auto", "lcm-auto")] if auto else []))


def row_name(preset: str, eta: float | None = None) -> str | None:
    """The table's row for one sampler: "LCM" (LCMScheduler), "TCD γ=g" or "TCD spread γ=g"; None for any other
    preset."""
    if preset == "lcm":
        return "LCM"
    return {"tcd": f"TCD γ={eta:g}", "tcd-spread": f"TCD spread γ={eta:g}"}.get(preset) if eta is not None else None


def score_seed(run_dir: Path, out: Path, gammas: list[float], steps: list[int], n: int, auto: bool = False,
               spread: bool = False) -> dict:
    from lcm.evaluate import evaluate

    students = [(name, str(run_dir), spec) for name, spec in samplers(gammas, auto, spread)]
    rows = evaluate(str(TEACHER), None, out, n=n, steps=steps, teacher_extra_steps=(), teacher_w=0.5,
                    methods=[s[0] for s in students], students=students)
    scores: dict = {}
    for r in rows:
        scores.setdefault(r.method, {})[str(r.steps)] = {"fd": r.frechet, "acc": r.accuracy}
    return scores


def with_rules(rows: list[dict], rules: list[str], gammas: list[float], steps: list[int]) -> list[dict]:
    """Each seed's scores plus one row per by-step-count preset in `rules` (`tcd-mix-auto`, …), composed cell by cell
    from the rows its rule picks (LCMScheduler → "LCM", TCD at eta g → "TCD γ=g"). Sampling is seeded per image, so a
    cell is the same whichever row samples it: the lcm-auto rows, sampled directly, equal the cells they pick."""
    from lcm.presets import get_preset, resolve_preset

    out = []
    for r in rows:
        scores = dict(r["scores"])
        for rule in rules:
            if not get_preset(rule).by_steps:
                raise SystemExit(f"--rule {rule}: not a by-step-count preset")
            cells = {}
            for k in steps:
                preset, eta = resolve_preset(rule, k)
                name = row_name(preset, eta)
                if name not in scores or (preset.startswith("tcd") and eta not in gammas):
                    raise SystemExit(f"--rule {rule} samples {k} steps with {preset}"
                                     + (f"@{eta:g}" if eta is not None else "") + ": add it to --gammas"
                                     + " and give --spread" * (preset == "tcd-spread"))
                cells[str(k)] = scores[name][str(k)]
            scores[rule] = cells
        out.append({**r, "scores": scores})
    return out


def table(rows: list[dict], steps: list[int], names: list[str]) -> str:
    head = ("| sampler | seed | " + " | ".join(f"{k} steps FD / acc" for k in steps) + " | 8 / 4 |\n|"
            + "---|" * (len(steps) + 3) + "\n")
    lines = []
    for name in names:
        for r in rows:
            s = r["scores"][name]
            ratio = s["8"]["fd"] / s["4"]["fd"] if {"4", "8"} <= set(s) else float("nan")
            lines.append(f"| {name} | {r['seed']} | " + " | ".join(
                f"{s[str(k)]['fd']:.1f} / {100 * s[str(k)]['acc']:.1f}%" for k in steps) + f" | {ratio:.2f} |")
        cells = []
        for k in steps:
            fds = [r["scores"][name][str(k)]["fd"] for r in rows]
            cells.append(f"**{statistics.median(fds):.1f}** ({min(fds):.1f}–{max(fds):.1f})")
        ratios = [r["scores"][name]["8"]["fd"] / r["scores"][name]["4"]["fd"] for r in rows
                  if {"4", "8"} <= set(r["scores"][name])]
        worst = f"worst {max(ratios):.2f}" if ratios else ""
        lines.append(f"| **{name}, median of {len(rows)}** (min–max) | | " + " | ".join(cells) + f" | {worst} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-2")
    p.add_argument("--gammas", default="0.3,0.5,0.7")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training (when one must run)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "mini"), help="folder of the NAME-s<seed> runs")
    p.add_argument("--config", default="mini_lcm_lora", help="what a missing run trains (a consistency preset)")
    p.add_argument("--script", default="train_lcm_lora.py", choices=("train_lcm_lora.py", "train_lcd.py"),
                   help="train_lcd.py: a whole-UNet student, sampled at the teacher's w through its embedding")
    p.add_argument("--name", default="lcm-lora", help="run-name prefix under --runs (quality_mini's --name)")
    p.add_argument("--auto", action="store_true", help="add an lcm-auto row (the step-count rule of lcm/presets.py)")
    p.add_argument("--spread", action="store_true", help="add TCD rows on timesteps spread over the whole grid")
    p.add_argument("--out", type=Path, default=RESULTS / "sampler_mini", help="writes OUT.jsonl, OUT.json, OUT.md")
    p.add_argument("--rule", action="append", default=[],
                   help="a by-step-count preset (tcd-mix-auto, …) shown as a row composed from the scored cells")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of --config for the runs trained here")
    args = p.parse_args(argv)
    log = args.out.with_suffix(".jsonl")
    seeds, gammas = parse_seeds(args.seeds), [float(g) for g in args.gammas.split(",")]
    steps = [int(k) for k in args.steps.split(",")]
    names = [name for name, _ in samplers(gammas, args.auto, args.spread)]
    # the runs scored are part of the key: another --name (or --config) is another set of students, not these seeds
    key = ({"gammas": gammas, "steps": steps, "n": args.n} | ({"auto": True} if args.auto else {})
           | ({"spread": True} if args.spread else {})
           | ({"config": args.config} if args.config != "mini_lcm_lora" else {})
           | ({"name": args.name} if args.name != "lcm-lora" else {})
           | ({"overrides": args.overrides} if args.overrides else {}))
    done = {r["seed"]: r for r in read_log(log) if r.get("key") == key}
    for seed in seeds:
        if seed in done:
            continue
        run_dir = Path(args.runs) / f"{args.name}-s{seed}"
        secs = None
        if not (run_dir / final_weights(args.script)).is_file():
            secs = train(args.config, args.overrides, seed, run_dir, args.threads, args.script)
        row = {"seed": seed, "key": key, "run": str(run_dir), "train_s": secs, "commit": commit(),
               "scores": score_seed(run_dir, run_dir / "eval-samplers", gammas, steps, args.n, args.auto,
                                    args.spread)}
        append_log(log, row)
        done[seed] = row
        print(f"seed {seed}: " + "; ".join(f"{n}: " + " ".join(f"{row['scores'][n][str(k)]['fd']:.1f}" for k in steps)
                                          for n in names), flush=True)
    rows = with_rules([done[s] for s in seeds], args.rule, gammas, steps)
    student = ("" if args.config == "mini_lcm_lora" else f" --config {args.config} --script {args.script} --name "
               f"{args.name}") + "".join(f" {o}" for o in args.overrides)
    md = (f"## One consistency student, several samplers (issue #13: 8 steps)\n\n`python -m benchmarks.sampler_mini "
          f"--seeds {args.seeds} --gammas {args.gammas} --steps {args.steps} --n {args.n}{' --auto' * args.auto}"
          f"{' --spread' * args.spread}{''.join(f' --rule {r}' for r in args.rule)}"
          f"{student}`\n\n{os.cpu_count()} CPUs, {platform.machine()}; {args.n} eval samples per cell; commits "
          f"{sorted({r['commit'] for r in rows})}. FD / accuracy by `lcm eval`'s evaluate; every row samples the same "
          f"student of that seed (`configs/{args.config}.yaml`).\n\n" + table(rows, steps, names + args.rule))
    args.out.with_suffix(".md").write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
