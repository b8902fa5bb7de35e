"""What both entry scripts do before and around the loop: arguments, config, accelerator, data, teacher, loss spec,
validation grids. Keeping it here is what keeps `train_lcm_lora.py` and `train_lcd.py` thin and free of copies."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.utils import set_seed

from . import cpu_lowp
from .cache import CachedDataset
from .config import check_config, load_config, mark_missing, resolve_config, to_yaml
from .consistency import LCDSpec
from .data import StreamingImages, build_dataset, collate_fn, format_summary
from .errors import DataError
from .models import encoder_names, load_pipeline, module_names, noise_schedule_of, weight_dtype_for
from .sampling import generate, image_grid, student_eta, student_scheduler_for, student_timesteps
from .schedule import SolverGrid
from .trainer import make_accelerator, train


def parse_train_args(argv, doc: str, default_config: str) -> argparse.Namespace:
    """`--config NAME|FILE`, `--resume`, `--dry-run` and dotted overrides, the same for every entry script."""
    p = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0])
    p.add_argument("--config", default=default_config, help="a YAML file or the name of a preset in configs/")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (same as train.resume=…)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_train_steps=100")
    return p.parse_args(argv)


@dataclass
class Run:
    """Everything an entry script builds its roles from."""

    cfg: Any
    accelerator: Any
    dataset: Any
    collate_fn: Any
    summary: str
    pipe: Any
    spec: LCDSpec


def prepare_run(args: argparse.Namespace, schema) -> Optional[Run]:
    """Resolve the config (None after --dry-run), then data before models, then the teacher pipeline and the spec."""
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    if args.dry_run:
        # Print what resolved, with missing required keys marked, before saying what is wrong (exit status 2).
        cfg = resolve_config(args.config, overrides, schema=schema)
        print(mark_missing(to_yaml(cfg), cfg))
        check_config(cfg)
        return None
    cfg = load_config(args.config, overrides, schema=schema)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    accelerator = make_accelerator(cfg.train)
    # Important: seed everything that draws from the global RNGs (LoRA init, the student copy). torch's default
    # generator starts from a random seed in every process, so without this two runs with the same train.seed differ.
    set_seed(cfg.train.seed)
    # Data first: an empty or unusable folder (or a stale cache) fails here, before any model is loaded.
    dataset = CachedDataset(cfg, seed=cfg.train.seed) if cfg.data.cache_dir else build_dataset(cfg.data,
                                                                                              seed=cfg.train.seed)
    summary = dataset.describe() if isinstance(dataset, StreamingImages) else format_summary(dataset.summary)
    accelerator.print(summary)
    if len(dataset) < cfg.train.batch_size:
        raise DataError(f"only {len(dataset)} usable image(s), fewer than train.batch_size={cfg.train.batch_size} "
                         f"({summary})")
    # From a cache, the VAE and text encoders stay on disk; validation loads them when it first needs them.
    pipe = load_pipeline(cfg.model.kind, cfg.model.pretrained, weight_dtype_for(cfg.train.mixed_precision),
                         cfg.model.revision, cfg.model.variant, config_dir=cfg.model.config_dir,
                         without=encoder_names(cfg.model.kind) if cfg.data.cache_dir else ())
    pipe.to(accelerator.device)
    sc = pipe.scheduler.config
    d = cfg.distill
    grid = SolverGrid(sc.num_train_timesteps, d.num_ddim_timesteps, d.top_index_share)
    spec = LCDSpec(noise_schedule_of(pipe.scheduler), grid, sc.prediction_type, d.solver, d.loss, d.huber_c,
                   d.sigma_data, d.timestep_scaling, d.teacher_batched, d.loss_weighting, d.teacher_cfg,
                   terminal_pure_noise=d.terminal_pure_noise)
    return Run(cfg, accelerator, dataset, collate_fn, summary, pipe, spec)


def _with_encoders(run: Run):
    """The teacher pipeline with its VAE and text encoders: loaded on first use when training from a latent cache,
    sharing the training UNet and scheduler (never reloading or re-freezing them)."""
    cfg, pipe = run.cfg, run.pipe
    if pipe.vae is None:
        names = encoder_names(cfg.model.kind)
        others = tuple(n for n in module_names(cfg.model.kind) if n not in names and getattr(pipe, n) is not None)
        encoders = load_pipeline(cfg.model.kind, cfg.model.pretrained, weight_dtype_for(cfg.train.mixed_precision),
                                 cfg.model.revision, cfg.model.variant, without=others,
                                 config_dir=cfg.model.config_dir)
        encoders.to(run.accelerator.device)
        run.pipe = type(pipe)(**{**encoders.components, **{n: pipe.components[n] for n in others}})
    return run.pipe


def apply_speed_options(network, train_cfg) -> None:
    """The trained network's speed options, in place: gradient checkpointing, channels_last weights, torch.compile.

    In place matters: LoRA's teacher and target are the same UNet object, and accelerate wraps this same module, so
    every role gets the faster network without re-wrapping. Attention needs nothing here: diffusers' default processor
    (`AttnProcessor2_0`) already calls torch's scaled_dot_product_attention (tests/test_speed_options.py checks it),
    except under bf16/fp16 on a CPU, where lcm/cpu_lowp.py swaps it and group norm for faster kernels.
    """
    cpu_lowp.apply(network, train_cfg)  # bf16 attention and group norm are slow on CPUs; see lcm/cpu_lowp.py
    if train_cfg.gradient_checkpointing:
        network.enable_gradient_checkpointing()
    if train_cfg.channels_last:
        # Module.to rebinds each parameter's .data, so trainable-parameter lists taken before stay valid.
        network.to(memory_format=torch.channels_last)
    if train_cfg.torch_compile:
        network.compile(backend=train_cfg.compile_backend)


def validation_grid(run: Run, replace: dict, step: int, out_dir: Path) -> None:
    """A PNG grid (a row per prompt, a column per seed) from the current weights with the objective's scheduler
    (`student_scheduler_for`: LCMScheduler for consistency students); `replace` swaps
    pipeline components (e.g. {"unet": student}) for this grid only."""
    cfg, pipe = run.cfg, _with_encoders(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    scheduler = student_scheduler_for(cfg.distill, pipe.scheduler.config)
    val = type(pipe)(**{**pipe.components, **replace, "scheduler": scheduler})
    val.set_progress_bar_config(disable=True)
    v = cfg.validation
    images = generate(val, list(v.prompts), list(v.seeds), v.num_inference_steps, v.guidance_scale,
                      cfg.data.resolution, cfg.data.resolution,
                      eta=student_eta(cfg.distill, v.num_inference_steps),
                      timesteps=student_timesteps(cfg.distill, v.num_inference_steps,
                                                  scheduler.config.num_train_timesteps))
    image_grid(images, len(v.seeds)).save(out_dir / f"step-{step:06d}.png")


def run_task(run: Run, task) -> int:
    """Train, then report what the data did during training and where the result is; the scripts' exit code."""
    train(run.cfg, run.accelerator, task)
    if run.dataset.summary.n_decode_errors:  # files that passed the header check but failed to decode mid-run
        run.accelerator.print(format_summary(run.dataset.summary))
    run.accelerator.print(f"done: {run.cfg.train.output_dir}/final")
    return 0
