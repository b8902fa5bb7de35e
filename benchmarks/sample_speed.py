"""Sampling speed on the mini teacher with an LCM-LoRA: the `lcm sample` command vs the same job written by hand
with diffusers (load, LoRA, LCMScheduler, 4 steps, save PNGs), and fused vs unfused LoRA vs the base model.

    python -m benchmarks.sample_speed [--repeats 5] [--rounds 2]

Targets (issue 6): `lcm sample` within 5% of the hand-written job; a fused LoRA no slower than the base model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.harness import Case, Ratio, bench_arg_parser, run_benchmark

ROOT = Path(__file__).resolve().parents[1]
MINI_TEACHER = str(ROOT / "lcm" / "assets" / "mini_teacher")
PROMPTS = [f"a handwritten digit {d}" for d in ("zero", "one", "two", "three", "four", "five", "six", "seven")]
SEEDS = list(range(8))
STEPS, SIZE, CHUNK = 4, 16, 8  # 64 images in 8 pipeline calls of 8, as `lcm sample` batches them


def build_cli(lora: str, out: str):
    """The whole `lcm sample` command, in process: load, LoRA, scheduler, generate, write PNGs."""
    from lcm.cli import main

    argv = ["sample", "--base", MINI_TEACHER, "--lora", lora, "--seeds", "0-7", "--steps", str(STEPS),
            "--height", str(SIZE), "--width", str(SIZE), "--out", out]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    return lambda: main(argv)


def build_by_hand(lora: str, out: str):
    """The same job as a user writes it with diffusers directly."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    def job():
        pipe = StableDiffusionXLPipeline.from_pretrained(MINI_TEACHER)
        pipe.load_lora_weights(lora)
        pipe.scheduler = LCMScheduler.from_pretrained(lora, subfolder="scheduler")
        pipe.set_progress_bar_config(disable=True)
        jobs = [(p, s) for p in range(len(PROMPTS)) for s in SEEDS]
        for start in range(0, len(jobs), CHUNK):
            chunk = jobs[start:start + CHUNK]
            images = pipe([PROMPTS[p] for p, _ in chunk], num_inference_steps=STEPS, guidance_scale=1.0,
                          height=SIZE, width=SIZE,
                          generator=[torch.Generator().manual_seed(s) for _, s in chunk]).images
            for (p, s), image in zip(chunk, images):
                image.save(Path(out) / f"prompt{p:02d}_seed{s}.png")

    Path(out).mkdir(parents=True, exist_ok=True)
    return job


def build_generate(lora: str | None, fuse: bool):
    """Generation only (models loaded once): base model, LoRA unfused (PEFT layers) or fused into the weights."""
    from lcm.sampling import generate, load_pipeline_for_sampling

    pipe = load_pipeline_for_sampling(MINI_TEACHER, [(lora, 1.0)] if lora else [], fuse=fuse, device="cpu")
    return lambda: generate(pipe, PROMPTS, SEEDS, STEPS, 1.0, SIZE, SIZE, batch_size=CHUNK)


def _train_lora(out: Path) -> str:
    """A real LCM-LoRA run folder on the mini teacher (2 steps: speed does not depend on how well it is trained)."""
    from lcm.tiny import make_captioned_image_folder
    from tests._helpers import load_entry_script

    data = make_captioned_image_folder(out / "data", n=8, size=SIZE)
    load_entry_script("train_lcm_lora").main([
        "--config", "mini_lcm_lora", f"data.path={data}", f"train.output_dir={out / 'run'}", "train.batch_size=4",
        "train.max_train_steps=2", "train.report_to=none", "validation.every_n_steps=0", "train.checkpoint_every=0"])
    return str(out / "run" / "final")


def main(argv=None) -> dict:
    args = bench_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="lcm-bench-sample-"))
    lora = _train_lora(tmp)
    n = len(PROMPTS) * len(SEEDS)
    cases = [
        Case("lcm sample (command)", build_cli, dict(lora=lora, out=str(tmp / "cli")), units=n, unit="image"),
        Case("diffusers by hand", build_by_hand, dict(lora=lora, out=str(tmp / "hand")), units=n, unit="image"),
        Case("base model", build_generate, dict(lora=None, fuse=False), units=n, unit="image"),
        Case("LoRA unfused", build_generate, dict(lora=lora, fuse=False), units=n, unit="image"),
        Case("LoRA fused", build_generate, dict(lora=lora, fuse=True), units=n, unit="image"),
    ]
    ratios = [Ratio("lcm sample overhead", "lcm sample (command)", "diffusers by hand", target_max=1.05),
              Ratio("fused / base", "LoRA fused", "base model", target_max=1.0),
              Ratio("unfused / base", "LoRA unfused", "base model"),
              Ratio("fused / unfused", "LoRA fused", "LoRA unfused")]
    return run_benchmark(f"Sampling, mini teacher, {n} images × {STEPS} steps at {SIZE} px", cases, ratios,
                         repeats=args.repeats, warmup=args.warmup, rounds=args.rounds, threads=args.threads,
                         out_dir=args.out, slug="sample_speed")


if __name__ == "__main__":
    main()
