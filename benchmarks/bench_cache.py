"""Training steps/s with the latent cache on vs off, at equal batch (issue 6, target: cache ≥ 3× uncached).

One timed step = what the training loop does per optimiser step: next batch from the loader (uncached: decode, resize,
crop; cached: read and checksum shard records), `lcd_batch_from_data` (uncached: VAE + both text encoders), the LoRA
consistency loss (student, target and one batched teacher call), backward, AdamW step. Set-up goes through the real
`prepare_run` (so the cached case really loads no VAE or text encoder), and `lcm cache` runs during set-up, untimed.

Models: tiny SDXL-architecture teachers (`lcm/tiny.py`) at two sizes on generated shapes whose source files are 8× the
training size (as real photos are larger than the training size): "tiny" (the test model, 16 px from 128 px files)
and "tiny-M" (2× the widths, 32 px from 256 px files, as in `benchmarks/train_speed.py`); and the shipped mini teacher
on the 16 px digits.

Run:  python benchmarks/bench_cache.py [--repeats 5 --rounds 2 --batch-size 16]
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Case, Ratio, bench_arg_parser, run_benchmark  # noqa: E402

MODELS = ("tiny", "tiny-M", "mini")
TINY_M = dict(sample_size=16, block_out_channels=(64, 128), cross_attention_dim=128)  # as train_speed.py's M


def _teacher_and_data(model: str, root: Path) -> tuple[str, str, str, int]:
    """(preset, teacher folder, data folder, training resolution) for a model name."""
    if model in ("tiny", "tiny-M"):
        from lcm.tiny import make_captioned_image_folder, save_tiny_pipeline

        resolution = 16 if model == "tiny" else 32
        teacher = save_tiny_pipeline("sdxl", root / "teacher", **({} if model == "tiny" else TINY_M))
        return ("demo_lcm_lora", str(teacher),
                str(make_captioned_image_folder(root / "data", n=64, size=8 * resolution)), resolution)
    from lcm.cli import MINI_TEACHER
    from lcm.digits import export_digits_folder

    return "mini_lcm_lora", str(MINI_TEACHER), str(export_digits_folder(root / "digits")), 16


def build(model: str, cache: bool, batch_size: int):
    """A closure running one LoRA distillation training step, from the cache or from images."""
    from lcm.cache import build_cache
    from lcm.config import LCMLoraConfig, load_config
    from lcm.consistency import lcd_loss
    from lcm.data import build_loader
    from lcm.encode import lcd_batch_from_data
    from lcm.entry import parse_train_args, prepare_run
    from lcm.lora import add_lora
    from lcm.roles import base_role, denoiser_role
    from lcm.seeds import sample_generators
    from lcm.trainer import build_optimizer

    root = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    preset, teacher, data, resolution = _teacher_and_data(model, root)
    overrides = [f"model.pretrained={teacher}", f"data.path={data}", f"data.resolution={resolution}",
                 f"train.batch_size={batch_size}", f"train.output_dir={root / 'run'}", "train.report_to=none",
                 "lora.rank=8", "lora.alpha=8"] + ([f"data.cache_dir={root / 'cache'}"] if cache else [])
    if cache:
        build_cache(load_config(preset, overrides, schema=LCMLoraConfig), batch_size=64)
    run = prepare_run(parse_train_args(["--config", preset, *overrides], "", preset), LCMLoraConfig)
    assert (run.pipe.vae is None) == cache, "the cached case must not load the VAE"
    cfg, unet = run.cfg, run.pipe.unet
    params = add_lora(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
    optimizer = build_optimizer(params, cfg.optim)
    loader, _ = build_loader(run.dataset, run.collate_fn, batch_size, cfg.train.seed, cfg.data.num_workers)
    # A fresh pass over the loader per epoch (not itertools.cycle, which would replay stored, already-decoded batches).
    batches = (batch for _ in itertools.count() for batch in loader)
    student, teacher_role = denoiser_role(unet), base_role(unet)
    position = itertools.count(0, batch_size)

    def step():
        batch = next(batches)
        gens = sample_generators(cfg.train.seed, next(position), batch_size)
        lcd = lcd_batch_from_data(run.pipe, batch, gens, cfg.distill, run.spec.grid, "cpu")
        loss = lcd_loss(student, student, teacher_role, lcd, run.spec)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main(argv=None) -> int:
    p = bench_arg_parser(__doc__)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args(argv)
    cases, ratios = [], []
    for model in args.models.split(","):
        for cache in (False, True):
            cases.append(Case(f"{model}-{'cache' if cache else 'images'}", build,
                              dict(model=model, cache=cache, batch_size=args.batch_size), units=1, unit="step"))
        ratios.append(Ratio(f"{model}: cache speed-up", f"{model}-images", f"{model}-cache", target_min=3.0))
    run_benchmark("Latent cache: training steps/s", cases, ratios, repeats=args.repeats, warmup=args.warmup,
                  rounds=args.rounds, threads=args.threads, out_dir=args.out, slug="bench_cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
