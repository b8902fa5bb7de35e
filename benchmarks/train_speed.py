"""Training speed and memory of one LCM-LoRA optimiser step: one batched teacher call (2B rows) vs two calls, and
with vs without gradient checkpointing, on the mini teacher and on tiny SDXL UNets at two sizes.

    python -m benchmarks.train_speed [--repeats 5] [--rounds 1]

A step is what the training loop does per optimiser step (trainer.train): per-sample generators, the loss under
accelerate's autocast (VAE + text encoders + student + CFG teacher + target), backward, AdamW step. The batch is built
once per case, so image decoding is not timed. Each case runs in a fresh process (benchmarks/harness.py).
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from benchmarks.harness import Case, Ratio, bench_arg_parser, run_benchmark

ROOT = Path(__file__).resolve().parents[1]
MINI_TEACHER = ROOT / "lcm" / "assets" / "mini_teacher"
VARIANTS = {"batched": [], "two calls": ["distill.teacher_batched=false"],
            "grad ckpt": ["train.gradient_checkpointing=true"]}


def build_train_step(pretrained: str, data: str, resolution: int, batch_size: int, overrides: list[str]):
    """Set up the real LCM-LoRA task (train_lcm_lora.build_task) and return one optimiser step as a callable."""
    from lcm.config import LCMLoraConfig
    from lcm.entry import parse_train_args, prepare_run
    from lcm.seeds import sample_generators
    from lcm.trainer import build_optimizer

    from tests._helpers import load_entry_script

    args = parse_train_args(["--config", "demo_lcm_lora", f"model.pretrained={pretrained}", f"data.path={data}",
                             f"data.resolution={resolution}", f"train.batch_size={batch_size}",
                             "train.report_to=none", "lora.rank=16", "lora.alpha=16", *overrides], "", "")
    run = prepare_run(args, LCMLoraConfig)
    task = load_entry_script("train_lcm_lora").build_task(run)
    accelerator = run.accelerator
    model, optimizer = accelerator.prepare(task.model, build_optimizer(task.params, run.cfg.optim))
    model.train()
    batch = run.collate_fn([run.dataset[i] for i in range(batch_size)])
    steps = itertools.count()

    def step():
        gens = sample_generators(run.cfg.train.seed, next(steps) * batch_size, batch_size)
        with accelerator.autocast():
            per_sample, _ = task.loss_fn(model, batch, gens)
        accelerator.backward(per_sample.mean())
        optimizer.step()
        optimizer.zero_grad()

    return step


def build_preset_step(config: str = "mini_lcm_lora", batch_size: int = 64, overrides: tuple = (), expose: bool = False,
                      root: str | None = None):
    """One optimiser step of a shipped preset on its own model and the digits folder, exactly as trainer.train runs it
    (per-step RNG seeding, per-sample generators, loss under autocast, backward, clip + AdamW + lr schedule, EMA).

    The returned `step(clock=None) -> seconds` adds its generator / backward / optimiser seconds to `clock` when given.
    `expose=True` returns {"step", "net", "pipe", "task"} instead (benchmarks/profile_step.py hooks the modules).
    `root`: another checkout of this repository (e.g. an older commit's worktree) whose `lcm` package and
    train_lcm_lora.py are timed instead; only in a fresh process (the harness's), before `lcm` is first imported.
    """
    import sys
    import time

    # Our helpers first, from this checkout; neither imports lcm at import time.
    from benchmarks.quality_mini import ensure_digits
    from tests._helpers import load_entry_script

    if root is not None:
        if "lcm" in sys.modules and not sys.modules["lcm"].__file__.startswith(str(root)):
            raise RuntimeError("lcm is already imported from another checkout; time other roots in a fresh process")
        sys.path.insert(0, str(root))

    from lcm.config import LCMLoraConfig
    from lcm.entry import parse_train_args, prepare_run
    from lcm.seeds import sample_generators, seed_global_rng_for_step, step_generator
    from lcm.trainer import build_lr_scheduler, build_optimizer, clip_and_step

    args = parse_train_args(["--config", config, f"data.path={ensure_digits()}", f"model.pretrained={MINI_TEACHER}",
                             f"train.batch_size={batch_size}", "train.report_to=none",
                             "train.output_dir=" + tempfile.mkdtemp(prefix="lcm-bench-"), *overrides], "", "")
    run = prepare_run(args, LCMLoraConfig)
    task = load_entry_script("train_lcm_lora", root or ROOT).build_task(run)
    cfg, accelerator = run.cfg, run.accelerator
    optimizer = build_optimizer(task.params, cfg.optim)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_train_steps, 1)
    model, optimizer, lr_scheduler = accelerator.prepare(task.model, optimizer, lr_scheduler)
    model.train()
    batch = run.collate_fn([run.dataset[i] for i in range(batch_size)])
    steps = itertools.count()

    def step(clock=None):
        clock = {} if clock is None else clock
        tick = time.perf_counter
        start = tick()
        n = next(steps)
        seed_global_rng_for_step(step_generator(cfg.train.seed, 0, 1, n, 0, accelerator.device))
        gens = sample_generators(cfg.train.seed, n * batch_size, batch_size)
        t0 = tick()
        clock["per-sample generators"] = clock.get("per-sample generators", 0.0) + t0 - start
        with accelerator.autocast():
            per_sample, _ = task.loss_fn(model, batch, gens)
        t1 = tick()
        accelerator.backward(per_sample.mean())
        t2 = tick()
        clip_and_step(accelerator, task.params, optimizer, lr_scheduler, cfg.optim.max_grad_norm)
        task.after_optimizer_step()
        t3 = tick()
        clock["backward"] = clock.get("backward", 0.0) + t2 - t1
        clock["optimiser (clip, AdamW, EMA)"] = clock.get("optimiser (clip, AdamW, EMA)", 0.0) + t3 - t2
        return t3 - start

    if expose:
        return {"step": step, "net": task.model, "pipe": run.pipe, "task": task}
    return step


BF16_TORCH, BF16, BF16_FUSED = "now, bf16, torch's CPU kernels", "now, bf16", "now, bf16, LoRA fused in bf16"
BASELINE = "815721d"  # the code issue #13 measured (1.35 s/step on its machine); ratios are taken against it


def _checkout(commit: str) -> Path:
    """A detached worktree of `commit` (made once), so its code can be timed beside today's in one harness run."""
    import subprocess

    path = Path(tempfile.gettempdir()) / f"lcm-bench-{commit}"
    if not (path / "train_lcm_lora.py").is_file():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), commit], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def _latent_cache(overrides: list[str]) -> Path:
    """`lcm cache` of the digits folder for the mini preset (made once)."""
    import subprocess
    import sys

    from benchmarks.quality_mini import ensure_digits

    out = ROOT / "runs" / "mini" / "digits-cache"
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "lcm.cli", "cache", "--config", "mini_lcm_lora",
                        f"data.path={ensure_digits()}", f"model.pretrained={MINI_TEACHER}",
                        f"data.cache_dir={out}", *overrides], cwd=ROOT, check=True)
    return out


def preset_cases(batch_size: int, baseline: str = BASELINE) -> tuple[list[Case], list[Ratio]]:
    """The mini preset at rank 32 (issue #13 item 4): the baseline commit, today with PEFT's LoRA forward, today
    (fused LoRA forward), today on `lcm cache` latents, and today in bf16 (with torch's CPU kernels, with
    lcm/cpu_lowp.py's, and with the LoRA fused in bf16 too). Every case trains the same thing (EMA target 0.95); the
    bf16 ones in another precision, whose quality README reports."""
    same = ["distill.ema_decay=0.95"]  # the baseline commit's preset had the online target; time one configuration
    build = dict(config="mini_lcm_lora", batch_size=batch_size)
    cases = [
        Case(f"{baseline}", build_preset_step, dict(build, overrides=same, root=str(_checkout(baseline))),
             units=batch_size, unit="sample"),
        Case("now, PEFT LoRA forward", build_preset_step, dict(build, overrides=[*same, "lora.fused_forward=false"]),
             units=batch_size, unit="sample"),
        Case("now", build_preset_step, dict(build, overrides=same), units=batch_size, unit="sample"),
        Case("now, latent cache", build_preset_step,
             dict(build, overrides=[*same, f"data.cache_dir={_latent_cache([])}"]), units=batch_size, unit="sample"),
    ]
    bf16 = [*same, "train.mixed_precision=bf16"]
    bf16_cases = ((BF16_TORCH, ["train.cpu_lowp_kernels=false"]), (BF16, []), (BF16_FUSED, ["lora.fused_lowp=true"]))
    for name, extra in bf16_cases:
        cases.append(Case(name, build_preset_step, dict(build, overrides=[*bf16, *extra]), units=batch_size,
                          unit="sample"))
    ratios = [
        Ratio(f"{baseline} / now, time", baseline, "now", target_min=1.55),
        Ratio(f"{baseline} / now with latent cache, time", baseline, "now, latent cache", target_min=1.55),
        Ratio("PEFT forward / fused forward, time", "now, PEFT LoRA forward", "now"),
        Ratio(f"now / {baseline}, peak RSS", "now", baseline, metric="peak_rss_mib", target_max=1.0),
        Ratio(f"{baseline} / {BF16}, time", baseline, BF16, target_min=1.55),
        Ratio(f"{baseline} / {BF16_FUSED}, time", baseline, BF16_FUSED, target_min=1.55),
        Ratio(f"{BF16_TORCH} / {BF16}, time", BF16_TORCH, BF16),
        Ratio(f"now / {BF16_FUSED}, time", "now", BF16_FUSED),
    ]
    return cases, ratios


def main(argv=None) -> dict:
    from lcm.tiny import make_captioned_image_folder, save_tiny_pipeline

    p = bench_arg_parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=None, help="default: 8, or 64 with --preset")
    p.add_argument("--preset", action="store_true",
                   help=f"the mini LoRA preset at batch 64 against commit {BASELINE} (issue #13), not the tiny models")
    args = p.parse_args(argv)
    if args.preset:
        cases, ratios = preset_cases(args.batch_size or 64)
        return run_benchmark(f"LCM-LoRA mini preset training step, batch {args.batch_size or 64}, rank 32", cases,
                             ratios, repeats=args.repeats, warmup=args.warmup, rounds=args.rounds,
                             threads=args.threads, out_dir=args.out, slug="train_speed_preset")
    args.batch_size = args.batch_size or 8
    tmp = Path(tempfile.mkdtemp(prefix="lcm-bench-train-"))
    # name → (pretrained folder, image resolution). Tiny sizes: the test default, and 2× the widths at 2× the pixels.
    models = {
        "mini teacher 16px": (MINI_TEACHER, 16),
        "tiny SDXL S 16px": (save_tiny_pipeline("sdxl", tmp / "s", seed=0), 16),
        "tiny SDXL M 32px": (save_tiny_pipeline("sdxl", tmp / "m", seed=0, sample_size=16,
                                                block_out_channels=(64, 128), cross_attention_dim=128), 32),
    }
    cases, ratios = [], []
    for model, (path, res) in models.items():
        data = make_captioned_image_folder(tmp / f"data{res}", n=args.batch_size, size=res)
        for variant, overrides in VARIANTS.items():
            cases.append(Case(f"{model}, {variant}", build_train_step,
                              dict(pretrained=str(path), data=str(data), resolution=res, batch_size=args.batch_size,
                                   overrides=overrides), units=args.batch_size, unit="sample"))
        ratios += [Ratio(f"{model}: two calls / batched, time", f"{model}, two calls", f"{model}, batched"),
                   Ratio(f"{model}: grad ckpt / off, time", f"{model}, grad ckpt", f"{model}, batched"),
                   Ratio(f"{model}: grad ckpt / off, peak RSS", f"{model}, grad ckpt", f"{model}, batched",
                         metric="peak_rss_mib")]
    return run_benchmark(f"LCM-LoRA training step, batch {args.batch_size}", cases, ratios, repeats=args.repeats,
                         warmup=args.warmup, rounds=args.rounds, threads=args.threads, out_dir=args.out,
                         slug="train_speed")


if __name__ == "__main__":
    main()
