"""Sweep of the LCM-LoRA levers on the mini teacher at the preset's budget (400 steps × batch 64): screen every cell on
one training seed, then confirm the best few on three.

    python -m benchmarks.sweep_mini --screen [--cells w05,ema95] [--seed 0]
    python -m benchmarks.sweep_mini --confirm w05,ema95 [--seeds 0-2]
    python -m benchmarks.sweep_mini --table            # rewrite sweep_mini.md from the log only

A cell is a named list of dotted overrides on `configs/mini_lcm_lora.yaml` (or on the preset CELL_CONFIGS names). Trainings run one at a time, each in a
fresh process (benchmarks.quality_mini.train), and every scored run is appended to results/sweep_mini.jsonl as it
finishes, so a stopped sweep loses nothing and a rerun skips what is logged. Cells are ranked by their median 2- and
4-step FD (the preset's purpose), with the 8-step FD against 4 steps as the stability check.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks.quality_mini import RESULTS, ROOT, read_log, run_cell, teacher_rows

NO_ATTENTION = ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
RESNETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]

CELLS: dict[str, list[str]] = {
    "preset": [],
    # guidance: the LoRA has no w input, so it learns an average over the w range; the teacher's best FD is at w = 0.5
    "w05": ["distill.w_min=0.5", "distill.w_max=0.5"],
    # target: adapter-only EMA instead of the online adapters
    "ema95": ["distill.ema_decay=0.95"],
    "ema99": ["distill.ema_decay=0.99"],
    # which modules carry the LoRA
    "noattn": [f"lora.target_modules=[{','.join(NO_ATTENTION)}]"],
    "resnets": [f"lora.target_modules=[{','.join(RESNETS)}]"],
    # capacity and step size
    "rank8": ["lora.rank=8", "lora.alpha=8"],
    "lr5e-4": ["optim.lr=5.0e-4"],
    "lr2e-3": ["optim.lr=2.0e-3"],
    # loss metric and grid
    "huber01": ["distill.huber_c=0.01"],
    "l2": ["distill.loss=l2"],
    "n25": ["distill.num_ddim_timesteps=25"],
    "n100": ["distill.num_ddim_timesteps=100"],
    "n20": ["distill.num_ddim_timesteps=20"],
    "n10": ["distill.num_ddim_timesteps=10"],
    # combinations of the levers that screened best
    "w05-ema95": ["distill.w_min=0.5", "distill.w_max=0.5", "distill.ema_decay=0.95"],
    "w05-noattn": ["distill.w_min=0.5", "distill.w_max=0.5", f"lora.target_modules=[{','.join(NO_ATTENTION)}]"],
    "w05-lr5e-4": ["distill.w_min=0.5", "distill.w_max=0.5", "optim.lr=5.0e-4"],
    # teacher solver
    "dpm2s": ["distill.solver=dpm_solver_2s"],
    "heun": ["distill.solver=heun"],
    # per-grid-pair loss weight (the 8-step diagnosis: the student's error floor at small t)
    "invdelta": ["distill.loss_weighting=inverse_delta"],
    # time to quality: the preset on a shorter budget (the cosine schedule ends at the shorter step count)
    "steps200": ["train.max_train_steps=200"],
    "steps100": ["train.max_train_steps=100"],
    "n25-steps200": ["distill.num_ddim_timesteps=25", "train.max_train_steps=200"],
    "n25-steps150": ["distill.num_ddim_timesteps=25", "train.max_train_steps=150"],
    "n25-steps100": ["distill.num_ddim_timesteps=25", "train.max_train_steps=100"],
    # the adversarial objectives (issue #16), each from its own preset: mini_add_lora / mini_lcd_adv_lora
    "add": [],
    "add-w0.5": ["adversarial.weight=0.5"],
    "add-dlr1e-3": ["adversarial.optim.lr=1.0e-3"],
    # what won on the Gaussian-mixture toy (tests/test_oracle_adversarial.py): non-saturating, low t̂, λ = 1
    "add-toy": ["adversarial.loss=nonsaturating", "adversarial.t_hat_loc=-1.0", "adversarial.distill_weight=1.0"],
    "lcd_adv": [],
    "lcd_adv-w0.3": ["adversarial.weight=0.3"],
}
# Cells trained from another preset than mini_lcm_lora (their overrides apply on top of it).
CELL_CONFIGS = {cell: "mini_add_lora" for cell in CELLS if cell.startswith("add")}
CELL_CONFIGS.update({cell: "mini_lcd_adv_lora" for cell in CELLS if cell.startswith("lcd_adv")})
LOG = RESULTS / "sweep_mini.jsonl"
STEPS = [1, 2, 4, 8]


def table(n: int) -> str:
    """Every logged cell: its seeds, median FD per step count, spread at 4 steps, and the 8-vs-4 stability check."""
    rows = [r for r in read_log(LOG) if r["n"] == n and r.get("key") != "teacher"]
    by_cell: dict[str, list[dict]] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r)
    teacher = next((r["scores"] for r in read_log(LOG) if r.get("key") == "teacher" and r["n"] == n), None)
    lines = ["## LCM-LoRA sweep on the mini teacher (400 steps × batch 64 unless the cell says otherwise)", "",
             "`python -m benchmarks.sweep_mini --screen` then `--confirm CELLS`; FD of `lcm eval`'s evaluate, "
             f"{n} samples per cell. Median over the seeds listed; spread = max − min at 4 steps.", "",
             "| cell | overrides | seeds | 1 | 2 | 4 | 8 | 4-step spread | 8 ≤ 4 + 10% on every seed | commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if teacher:
        lines.append("| teacher DDIM | w = 0.5 | — | " + " | ".join(f"{teacher[str(k)]['fd']:.1f}" for k in STEPS)
                     + " | | | |")
    med = lambda rs, k: statistics.median(r["scores"][str(k)]["fd"] for r in rs)  # noqa: E731
    for cell, rs in sorted(by_cell.items(), key=lambda kv: med(kv[1], 2) + med(kv[1], 4)):
        four = [r["scores"]["4"]["fd"] for r in rs]
        stable = all(r["scores"]["8"]["fd"] <= 1.1 * r["scores"]["4"]["fd"] for r in rs)
        preset = rs[0].get("config", "mini_lcm_lora")
        what = " ".join(([f"--config {preset}"] if preset != "mini_lcm_lora" else []) + list(rs[0]["overrides"]))
        lines.append(f"| {cell} | `{what or '—'}` | {','.join(str(r['seed']) for r in rs)} | "
                     + " | ".join(f"{med(rs, k):.1f}" for k in STEPS)
                     + f" | {max(four) - min(four):.1f} | {'yes' if stable else 'no'} | {rs[-1]['commit']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--screen", action="store_true", help="one seed per cell")
    mode.add_argument("--confirm", metavar="CELLS", help="comma-separated cells to run on --seeds")
    mode.add_argument("--table", action="store_true", help="only rewrite sweep_mini.md from the log")
    p.add_argument("--cells", default=",".join(CELLS), help="cells to screen, in order")
    p.add_argument("--seed", type=int, default=0, help="the screening seed")
    p.add_argument("--seeds", default="0-2", help="confirmation seeds")
    p.add_argument("--n", type=int, default=500, help="eval samples per cell")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from lcm.sampling import parse_seeds

    if not args.table:
        names = (args.cells if args.screen else args.confirm).split(",")
        unknown = [c for c in names if c not in CELLS]
        if unknown:
            sys.exit(f"unknown cell(s) {unknown}; valid: {list(CELLS)}")
        seeds = [args.seed] if args.screen else parse_seeds(args.seeds)
        teacher_rows(LOG, args.n, STEPS, ROOT / "runs" / "sweep")
        for cell in names:
            run_cell(cell, CELL_CONFIGS.get(cell, "mini_lcm_lora"), CELLS[cell], seeds, LOG, ROOT / "runs" / "sweep", args.n, STEPS,
                     args.threads)
            (RESULTS / "sweep_mini.md").write_text(table(args.n))
    (RESULTS / "sweep_mini.md").write_text(table(args.n))
    print((RESULTS / "sweep_mini.md").read_text())


if __name__ == "__main__":
    main()
