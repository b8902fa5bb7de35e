"""Typed configuration: dataclass schemas, YAML presets in `configs/`, dotted command-line overrides (OmegaConf).

Strict by construction: OmegaConf.structured makes unknown keys and wrong types errors, and `ConfigError` names the
offending key. Named choices are checked against the registries they select from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# LCM-LoRA adapts attention projections, feed-forward layers, ResNet convolutions and the time-embedding projections
# (Luo et al. 2023, arXiv:2311.05556 §2). Names are suffixes matched by PEFT against diffusers' UNet module paths.
LCM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0",
    "proj_in", "proj_out",
    "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut",
    "downsamplers.0.conv", "upsamplers.0.conv",
    "time_emb_proj",
]


@dataclass
class ModelConfig:
    pretrained: str = MISSING  # a diffusers pipeline folder, a hub id, or one single-file checkpoint (.safetensors)
    kind: str = "sdxl"  # sdxl (also SSD-1B) | sd15 (also SD2.x) | pixart (PixArt-α; full LCD on it is PixArt-δ)
    revision: Optional[str] = None
    variant: Optional[str] = None
    config_dir: Optional[str] = None  # single file: a diffusers-layout folder with its configs + tokenizers (no weights)


@dataclass
class DataConfig:
    source: str = "folder"  # folder | hf | webdataset
    path: str = MISSING
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 1024
    center_crop: bool = True
    random_flip: bool = False
    buckets: bool = False  # SDXL aspect-ratio buckets of about resolution² pixels; a batch holds one bucket
    bucket_step: int = 64  # bucket sides are multiples of this (64 for SDXL; the tiny models need smaller)
    bucket_max_aspect: float = 2.0  # longest side / shortest side of the widest bucket
    max_samples: Optional[int] = None
    num_workers: int = 0
    cache_dir: Optional[str] = None  # a folder written by `lcm cache`: train on it, without VAE or text encoders
    # webdataset streaming (README "Streaming shards"): implied by a URL / pipe: path or .tar.gz/.tgz shards
    streaming: bool = False  # also stream local uncompressed .tar shards (instead of indexing them by offset)
    num_samples: Optional[int] = None  # streaming: samples per epoch over all ranks (a stream has no length); required
    shuffle_buffer: int = 1000  # streaming: encoded samples each loader worker holds to shuffle across shards; 0 = off


@dataclass
class LoraConfig:
    rank: int = 64
    alpha: float = 64.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGETS))


@dataclass
class DistillConfig:
    num_ddim_timesteps: int = 50  # N: the teacher grid, stored as original_inference_steps in the scheduler
    solver: str = "ddim"
    w_min: float = 3.0  # LCM convention: ε̂ = ε_c + w(ε_c − ε_u); diffusers guidance_scale = w + 1
    w_max: float = 15.0
    loss: str = "huber"
    huber_c: float = 0.001
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    ema_decay: float = 0.0  # LoRA: 0 = target is the online adapters (LCM-LoRA); > 0 keeps an adapter-only EMA
    teacher_batched: bool = True  # cond + uncond in one teacher call on 2B rows; false = two calls (benchmarks only)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    lr_scheduler: str = "constant_with_warmup"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0  # <= 0 disables clipping


@dataclass
class ValidationConfig:
    every_n_steps: int = 500  # 0 disables validation during training
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a watercolor painting of a lighthouse"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    num_inference_steps: int = 4
    guidance_scale: float = 1.0  # diffusers convention; LCM-LoRA samples best with 1–2


@dataclass
class TrainConfig:
    output_dir: str = "runs/lcm-lora"
    seed: int = 0
    batch_size: int = 4  # per process; global batch = batch_size × processes × gradient_accumulation_steps
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000  # optimiser steps
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    channels_last: bool = False  # the trained network's 4-D weights in NHWC (faster convolutions on GPUs / oneDNN)
    torch_compile: bool = False  # torch.compile the trained network in place (Module.compile)
    compile_backend: str = "inductor"  # any torch.compile backend; "aot_eager" checks capture without code generation
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 3
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | none
    resume: Optional[str] = None  # "latest" or a checkpoint folder


@dataclass
class LCMLoraConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FullDistillConfig(DistillConfig):
    ema_decay: float = 0.95  # full LCD: θ⁻ is an EMA of the whole student (LCM paper)
    w_embed_dim: int = 256  # the student's time_cond_proj_dim; its projection starts at zero
    ema_on_cpu: bool = False  # keep θ⁻ in host memory (saves accelerator memory, costs a copy per target call)


@dataclass
class LCDConfig:
    """Full latent consistency distillation (train_lcd.py): the whole UNet trains, with a guidance embedding."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: FullDistillConfig = field(default_factory=FullDistillConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=8e-6))
    validation: ValidationConfig = field(default_factory=lambda: ValidationConfig(guidance_scale=8.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/lcd"))


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


CHOICES = {
    "model.kind": ("sdxl", "sd15", "pixart"),
    "data.source": ("folder", "hf", "webdataset"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.report_to": ("tensorboard", "none"),
}


def resolve_preset(name_or_path: str) -> Path:
    """A YAML path as given, or the name of a preset in configs/ (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = CONFIG_DIR / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if preset.is_file():
        return preset
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset; presets: {known}")


def load_config(name_or_path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (), schema=LCMLoraConfig):
    """Schema defaults ← YAML preset ← dotted `key=value` overrides, validated; returns a typed OmegaConf object."""
    try:
        cfg = OmegaConf.structured(schema)
        if name_or_path:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(resolve_preset(name_or_path)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            if value.strip().lower() in _YAML11_BOOLS:
                # YAML 1.1 reads `no`/`off`/… as booleans, which turns train.mixed_precision=no into "False".
                # Quoted, a string field keeps the word and a bool field still parses it.
                item = f'{key}="{value.strip()}"'
            # Merging into the structured config raises for unknown keys and wrong types, naming the key.
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"bad config key {key!r}: {str(err).splitlines()[0]}") from None
    _validate(cfg)
    return cfg


_ABSENT = object()
_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}


def _validate(cfg) -> None:
    """Check named choices and ranges; every message names the key."""
    from .consistency import LOSSES
    from .solvers import SOLVERS

    choices: dict[str, Any] = dict(CHOICES)
    choices["distill.solver"] = tuple(SOLVERS)
    choices["distill.loss"] = tuple(LOSSES)
    for key, valid in choices.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and value not in valid:
            hint = " (in YAML, quote words like 'no': unquoted they read as booleans)" if value in ("True", "False") else ""
            raise ConfigError(f"{key}={value!r} is not one of {list(valid)}{hint}")
    d = cfg.distill
    if not d.w_min <= d.w_max:
        raise ConfigError(f"distill.w_min={d.w_min} must be <= distill.w_max={d.w_max}")
    if not 0.0 <= d.ema_decay < 1.0:
        raise ConfigError(f"distill.ema_decay={d.ema_decay} must be in [0, 1)")
    for key in ("train.batch_size", "train.max_train_steps", "train.gradient_accumulation_steps", "lora.rank",
                "data.num_samples"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1")
    if cfg.data.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer={cfg.data.shuffle_buffer} must be >= 0 (0 turns the buffer off)")
    if cfg.data.streaming and cfg.data.source != "webdataset":
        raise ConfigError(f"data.streaming=true needs data.source=webdataset, not {cfg.data.source!r}")


def to_yaml(cfg) -> str:
    """The resolved config as YAML: what is written to the run folder and printed by --dry-run."""
    return OmegaConf.to_yaml(cfg, resolve=True)
