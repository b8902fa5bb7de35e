"""Typed configuration: dataclass schemas, YAML presets in `configs/`, dotted command-line overrides (OmegaConf).

Strict by construction: OmegaConf.structured makes unknown keys and wrong types errors, and `ConfigError` names the
offending key. Named choices are checked against the registries they select from.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .constants import HUBER_C, NUM_DDIM_TIMESTEPS, SIGMA_DATA, TIMESTEP_SCALING
from .errors import UserError

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


# ----------------------------------------------------------------------------------------------------------------------
# Valid ranges, declared beside each numeric field (`bounded(...)`) and checked when the config is resolved, before
# any model is loaded. One mechanism: the range lives in the dataclass field's metadata under RANGE.

RANGE = "lcm_range"


@dataclass(frozen=True)
class Range:
    """A closed or open interval of valid values; every bounded value must also be finite (no nan/inf)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        def num(x):
            return f"{x:g}" if isinstance(x, float) else str(x)

        lo, hi = math.isfinite(self.lo), math.isfinite(self.hi)
        if lo and hi:
            return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        if lo:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        if hi:
            return f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        return "a finite number"


def bounded(default=MISSING, *, ge=None, gt=None, le=None, lt=None, default_factory=None):
    """A dataclass field with its valid range: ge/gt bound it below (closed/open), le/lt above; none = any finite
    number. For a list field, the range applies to each element."""
    rng = Range(lo=-math.inf if ge is None and gt is None else (gt if gt is not None else ge),
                hi=math.inf if le is None and lt is None else (lt if lt is not None else le),
                lo_open=gt is not None, hi_open=lt is not None)
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={RANGE: rng})
    return field(default=default, metadata={RANGE: rng})


def declared_ranges(schema) -> dict[str, Range]:
    """Every bounded field of a config schema (dataclass), by dotted key: {"optim.lr": Range(...), ...}."""
    found: dict[str, Range] = {}

    def walk(prefix: str, cls) -> None:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if RANGE in f.metadata:
                found[prefix + f.name] = f.metadata[RANGE]
            if is_dataclass(hints[f.name]):
                walk(f"{prefix}{f.name}.", hints[f.name])

    walk("", schema)
    return found


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
    resolution: int = bounded(1024, ge=8)  # pixels; the VAE downsamples by 8 (the tiny test models by less)
    center_crop: bool = True
    random_flip: bool = False
    follow_symlinks: bool = True  # folder source: follow file symlinks that point outside data.path (always counted)
    buckets: bool = False  # SDXL aspect-ratio buckets of about resolution² pixels; a batch holds one bucket
    # bucket sides are multiples of this (64 for SDXL; the tiny models need smaller)
    bucket_step: int = bounded(64, ge=1)
    bucket_max_aspect: float = bounded(2.0, ge=1.0)  # longest side / shortest side of the widest bucket
    max_samples: Optional[int] = bounded(None, ge=1)  # None = every usable image
    num_workers: int = bounded(0, ge=0)
    cache_dir: Optional[str] = None  # a folder written by `lcm cache`: train on it, without VAE or text encoders
    # webdataset streaming (README "Streaming shards"): implied by a URL / pipe: path or .tar.gz/.tgz shards
    streaming: bool = False  # also stream local uncompressed .tar shards (instead of indexing them by offset)
    # streaming: samples per epoch over all ranks (a stream has no length); required
    num_samples: Optional[int] = bounded(None, ge=1)
    # streaming: encoded samples each loader worker holds to shuffle across shards; 0 = off
    shuffle_buffer: int = bounded(1000, ge=0)


@dataclass
class LoraConfig:
    rank: int = bounded(64, ge=1)
    alpha: float = bounded(64.0, gt=0)  # the update is scaled by alpha / rank: 0 would train nothing
    dropout: float = bounded(0.0, ge=0, lt=1)
    target_modules: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGETS))
    # each LoRA layer as one kernel with W + s·B·A (lcm/fused_lora.py): the same function, faster; layers where that
    # would not be exact (dropout, DoRA, fp16 base weights) keep PEFT's forward on their own
    fused_forward: bool = True
    # with train.mixed_precision=bf16|fp16, fuse those layers too: W + s·B·A rounded once to bf16 (faster on CPU, not
    # PEFT's function: a delta under half a bf16 step of W is lost from the forward; measured in README)
    fused_lowp: bool = False


@dataclass
class DistillConfig:
    # N: the teacher grid, stored as original_inference_steps in the scheduler
    num_ddim_timesteps: int = bounded(NUM_DDIM_TIMESTEPS, ge=1, le=1000)
    solver: str = "ddim"
    w_min: float = bounded(3.0, ge=0)  # LCM convention: ε̂ = ε_c + w(ε_c − ε_u); diffusers guidance_scale = w + 1
    w_max: float = bounded(15.0, ge=0)
    loss: str = "huber"
    # per-grid-pair weight of the loss: uniform (LCM) or inverse_delta (1 / Δσ, improved consistency training)
    loss_weighting: str = "uniform"
    huber_c: float = bounded(HUBER_C, gt=0)
    sigma_data: float = bounded(SIGMA_DATA, gt=0)
    timestep_scaling: float = bounded(TIMESTEP_SCALING, gt=0)
    # LoRA: 0 = target is the online adapters (LCM-LoRA); > 0 keeps an adapter-only EMA
    ema_decay: float = bounded(0.0, ge=0, lt=1)
    teacher_batched: bool = True  # cond + uncond in one teacher call on 2B rows; false = two calls (benchmarks only)
    # false = "normal CFG" (PCM): distil the teacher's *unguided* ODE (w = 0, no unconditional pass, no w input), so
    # the student keeps real classifier-free guidance and negative prompts at sampling (guidance_scale 3–8)
    teacher_cfg: bool = True
    # true: a pair whose t_{n+k} is the top timestep T − 1 starts from pure noise ε, not the forward-diffused
    # √ᾱ z₀ + √(1 − ᾱ) ε (√ᾱ_999 = 0.068 on SD/SDXL schedules): the input 1-step sampling starts from
    terminal_pure_noise: bool = False
    # extra share of the grid's top pair (t_{n+k} = T − 1, the prediction a 1-step sampler uses) in the index draws:
    # P(top) = share + (1 − share)/N; 0 = uniform (LCM); the grid objectives only (not add / lightning)
    top_index_share: float = bounded(0.0, ge=0, lt=1)
    # share of rows whose clean latent is replaced by the EMA target's own x̂₀ from a noisier grid timestep (the
    # inputs a multistep sampler feeds the student; consistency.with_self_generated_z0); 0 = data only (LCM);
    # lcd / pcm / tcd only
    self_input_share: float = bounded(0.0, ge=0, lt=1)
    # lcd (consistency) | lcd_adv (LCD + adversarial term on the student's x̂₀) | add (SDXL-Turbo's ADD) | pcm (phased
    # consistency) | tcd (trajectory consistency) | pcm_adv, tcd_adv (pcm / tcd + the same adversarial term) |
    # lightning; the *_adv objectives and add train a discriminator as well (`adversarial`)
    objective: str = "lcd"
    # pcm: the number of phases M the grid is cut into (must divide num_ddim_timesteps); sample with M steps
    phases: int = bounded(2, ge=1, le=1000)
    # tcd: the sampler's gamma (TCDScheduler's eta) that validation uses and the model card records
    tcd_gamma: float = bounded(0.3, ge=0, le=1)
    # tcd / tcd_adv: share of rows whose end point is the clean end (LCD's target) instead of a drawn s ∈ [0, t_n]:
    # a student trained for both LCMScheduler's full re-noising and TCD's partial one; 0 = TCD, 1 = LCD
    tcd_clean_share: float = bounded(0.0, ge=0, le=1)
    # lightning (lcm/lightning.py): the progressive stages' student step counts, strictly decreasing, each stage
    # continuing from the previous one's weights; sample with the last stage's count
    stages: list[int] = bounded(default_factory=lambda: [8, 4, 2, 1], ge=1, le=1000)
    stage_steps: Optional[list[int]] = None  # optimiser steps per stage (sum = max_train_steps); None = even split
    mse_stages: int = bounded(1, ge=0)  # leading stages trained with MSE to the teacher's flow (the warm start)
    mse_weight: float = bounded(0.0, ge=0)  # the MSE kept beside the adversarial term after them (0 = the paper)
    x0_one_step: bool = True  # a final 1-step stage predicts x₀ directly (exported as the lightning-1step preset)
    teacher_steps: int = bounded(8, ge=1)  # teacher DDIM steps over 999 → 0; a segment of an n-step stage gets ⌈/n⌉
    # lightning: restart the student's LR schedule (optim.lr_scheduler, warm-up included) at each stage, as if each
    # stage were its own run from the previous one's weights; false = one schedule over all stages
    stage_lr_restart: bool = False


@dataclass
class OptimConfig:
    lr: float = bounded(1e-4, gt=0)
    adam_beta1: float = bounded(0.9, ge=0, lt=1)
    adam_beta2: float = bounded(0.999, ge=0, lt=1)
    weight_decay: float = bounded(1e-2, ge=0)
    adam_epsilon: float = bounded(1e-8, gt=0)
    use_8bit_adam: bool = False
    lr_scheduler: str = "constant_with_warmup"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = bounded(0, ge=0)
    max_grad_norm: float = bounded(1.0)  # <= 0 disables clipping


def _discriminator_optim() -> "OptimConfig":
    # GAN practice (StyleGAN, ADD): no first-moment momentum, β₂ = 0.99, no weight decay, constant rate
    return OptimConfig(lr=1e-4, adam_beta1=0.0, adam_beta2=0.99, weight_decay=0.0, lr_scheduler="constant")


@dataclass
class AdversarialConfig:
    """The discriminator and the adversarial terms of distill.objective=lcd_adv | pcm_adv | tcd_adv | add | lightning
    (lcm/objectives.py)."""

    backbone: str = "frozen"  # frozen: the teacher's encoder, adapters off, no gradients into it; trainable: a copy
    loss: str = "hinge"  # hinge | nonsaturating
    # generator-side weight of the adversarial term (*_adv: beside the consistency loss's 1; add: beside
    # λ·distillation), reached linearly over warmup_steps
    weight: float = bounded(0.1, ge=0)
    warmup_steps: int = bounded(0, ge=0)
    r1_gamma: float = bounded(0.0, ge=0)  # R1 on real inputs, γ/2·‖∇D‖²; 0 = off
    # t̂ ~ shift(sigmoid(loc + scale·n)) (LADD's logit-normal); timestep round(t̂·(T − 1))
    t_hat_loc: float = bounded(1.0, ge=-10, le=10)
    t_hat_scale: float = bounded(1.0, gt=0)
    t_hat_shift: float = bounded(1.0, gt=0)
    head_hidden: int = bounded(64, ge=4)  # width of each feature level's head
    # lightning: D also reads x_t (the paper's conditional objective); false = the relaxed, unconditional one
    conditional: bool = True
    d_steps_per_g: int = bounded(1, ge=1)
    # lcd_adv / pcm_adv / tcd_adv: the generator term only on rows with t_{n+k} ≤ this (999 = every row)
    student_t_max: int = bounded(999, ge=0, le=999)
    # lcd_adv / pcm_adv / tcd_adv: what the term judges. clean: the student's clean estimate f_θ(z → clean end), at a
    # t̂ on [0, T − 1]; end: its consistency output at each row's end point s (PCM's phase edge, TCD's drawn s), the
    # sample its sampler takes, at a t̂ ≥ s against real latents noised to that t̂ (for lcd_adv the two are the same)
    judge: str = "clean"
    optim: OptimConfig = field(default_factory=_discriminator_optim)
    # ADD only: the student's fixed timesteps, λ and c(t) of the distillation term
    student_timesteps: list[int] = bounded(default_factory=lambda: [999, 749, 499, 249], ge=0, le=999)
    distill_weight: float = bounded(2.5, ge=0)
    distill_weighting: str = "alpha_bar"


@dataclass
class ValidationConfig:
    every_n_steps: int = bounded(500, ge=0)  # 0 disables validation during training
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a watercolor painting of a lighthouse"])
    seeds: list[int] = bounded(default_factory=lambda: [0, 1], ge=0, le=2**63 - 1)  # torch generator seeds
    num_inference_steps: int = bounded(4, ge=1)  # at most distill.num_ddim_timesteps (LCMScheduler's limit)
    guidance_scale: float = bounded(1.0, ge=0)  # diffusers convention; LCM-LoRA samples best with 1–2


@dataclass
class TrainConfig:
    output_dir: str = "runs/lcm-lora"
    seed: int = bounded(0, ge=0, le=2**32 - 1)  # numpy's seed range (accelerate.set_seed seeds numpy too)
    # per process; global batch = batch_size × processes × gradient_accumulation_steps
    batch_size: int = bounded(4, ge=1)
    gradient_accumulation_steps: int = bounded(1, ge=1)
    max_train_steps: int = bounded(1000, ge=1)  # optimiser steps
    mixed_precision: str = "no"  # no | fp16 | bf16
    # bf16/fp16 on a CPU: attention on diffusers' AttnProcessor and group norm in fp32, whose low-precision CPU kernels
    # are slow (lcm/cpu_lowp.py); false keeps torch's (benchmarks). No effect on GPUs or in fp32.
    cpu_lowp_kernels: bool = True
    gradient_checkpointing: bool = False
    channels_last: bool = False  # the trained network's 4-D weights in NHWC (faster convolutions on GPUs / oneDNN)
    torch_compile: bool = False  # torch.compile the trained network in place (Module.compile)
    compile_backend: str = "inductor"  # any torch.compile backend; "aot_eager" checks capture without code generation
    checkpoint_every: int = bounded(500, ge=0)  # 0 = no checkpoints
    checkpoints_total_limit: int = bounded(3, ge=1)
    log_every: int = bounded(10, ge=1)
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
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


@dataclass
class FullDistillConfig(DistillConfig):
    ema_decay: float = bounded(0.95, ge=0, lt=1)  # full LCD: θ⁻ is an EMA of the whole student (LCM paper)
    w_embed_dim: int = bounded(256, ge=4)  # the student's time_cond_proj_dim; its projection starts at zero
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
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


class ConfigError(UserError, ValueError):
    """A configuration problem, with the offending key in the message."""


# Named choices without a registry of their own; model.kind, data.source, distill.solver and distill.loss are checked
# against the keys of the registries they select from (`registry_choices`).
CHOICES = {
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.report_to": ("tensorboard", "none"),
    "adversarial.backbone": ("frozen", "trainable"),  # trainable: D's own copy of the encoder (SDXL-Lightning)
    "adversarial.judge": ("clean", "end"),  # what the *_adv term judges (lcm/objectives.py with_adversarial_term)
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
    cfg = resolve_config(name_or_path, overrides, schema)
    check_config(cfg)
    return cfg


def resolve_config(name_or_path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (),
                   schema=LCMLoraConfig):
    """The merged config with types checked but required keys possibly missing ('???') and ranges unchecked: what
    `--dry-run` prints before `check_config` says what is wrong."""
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
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"bad config key {key!r}: {str(err).splitlines()[0]}") from None
    return cfg


def check_config(cfg) -> None:
    """Required keys present, named choices valid, every bounded value in its range, cross-field sanity."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}; set them as key=value arguments, "
                          f"e.g. {missing[0]}=…")
    _validate(cfg)


def mark_missing(yaml_text: str, cfg) -> str:
    """The YAML with every missing required value ('???') marked by a comment naming its key."""
    missing, section, out = set(OmegaConf.missing_keys(cfg)), [], []
    for line in yaml_text.splitlines():
        indent = (len(line) - len(line.lstrip(" "))) // 2
        name = line.strip().split(":", 1)[0]
        section = section[:indent] + [name]
        key = ".".join(section)
        out.append(f"{line}  # <- missing: required, set {key}=…" if key in missing and line.endswith("???") else line)
    return "\n".join(out) + "\n"


_ABSENT = object()
_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}


def _check_ranges(cfg) -> None:
    """Every field declared with `bounded(...)` against its range; the message names the key, value and range."""
    for key, rng in declared_ranges(OmegaConf.get_type(cfg)).items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:  # an Optional field left unset
            continue
        values = list(value) if OmegaConf.is_list(value) else [value]
        bad = [v for v in values if v not in rng]
        if bad:
            shown = list(value) if OmegaConf.is_list(value) else value
            each = "each element " if OmegaConf.is_list(value) else ""
            raise ConfigError(f"{key}={shown!r} is out of range: {each}must be {rng}"
                              + (f" (got {bad[0]!r})" if each else ""))


def _check_cross_fields(cfg) -> None:
    """Sanity between keys: guidance range ordered, validation runnable with the trained grid."""
    d, v = cfg.distill, cfg.validation
    if not d.w_min <= d.w_max:
        raise ConfigError(f"distill.w_min={d.w_min} must be <= distill.w_max={d.w_max}")
    from .objectives import ADVERSARIAL_VARIANTS, base_objective

    if base_objective(d.objective) == "pcm" and d.num_ddim_timesteps % d.phases:
        raise ConfigError(f"distill.phases={d.phases} must divide distill.num_ddim_timesteps={d.num_ddim_timesteps} "
                          "(each phase holds the same number of grid points)")
    if d.top_index_share > 0 and d.objective in ("add", "lightning"):  # they draw their own student timesteps
        raise ConfigError(f"distill.top_index_share={d.top_index_share} reweights the consistency grid's pairs; "
                          f"distill.objective={d.objective!r} draws its own student timesteps (drop the key)")
    if d.self_input_share > 0 and d.objective not in ("lcd", "pcm", "tcd"):
        raise ConfigError(f"distill.self_input_share={d.self_input_share} applies to the plain consistency objectives "
                          f"(lcd, pcm, tcd); distill.objective={d.objective!r} does not take it")
    if cfg.adversarial.student_t_max < 999 and d.objective not in ADVERSARIAL_VARIANTS:
        # add / lightning draw their own timesteps; lcd / pcm / tcd have no term to restrict (the key would do nothing)
        raise ConfigError(f"adversarial.student_t_max={cfg.adversarial.student_t_max} restricts the term of "
                          f"{' / '.join(ADVERSARIAL_VARIANTS)}; distill.objective={d.objective!r} does not take it")
    if d.tcd_clean_share > 0 and base_objective(d.objective) != "tcd":
        raise ConfigError(f"distill.tcd_clean_share={d.tcd_clean_share} mixes the clean end into TCD's drawn end "
                          f"points; distill.objective={d.objective!r} is not tcd / tcd_adv (drop the key)")
    if cfg.adversarial.judge != "clean" and d.objective not in ADVERSARIAL_VARIANTS:
        raise ConfigError(f"adversarial.judge={cfg.adversarial.judge!r} chooses what the term of "
                          f"{' / '.join(ADVERSARIAL_VARIANTS)} judges; distill.objective={d.objective!r} does not take it")
    if d.stage_lr_restart and d.objective != "lightning":
        raise ConfigError(f"distill.stage_lr_restart=true restarts the LR at Lightning's stages; distill.objective="
                          f"{d.objective!r} has none (set distill.objective=lightning or drop the key)")
    if d.objective == "lightning":
        from .lightning import check_stages
        try:
            check_stages(list(d.stages), None if d.stage_steps is None else list(d.stage_steps),
                         cfg.train.max_train_steps, d.mse_stages)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if d.stages[-1] == 1 and d.x0_one_step and v.every_n_steps > 0 and v.num_inference_steps != 1:
            raise ConfigError(f"validation.num_inference_steps={v.num_inference_steps}: a final 1-step stage with "
                              "distill.x0_one_step=true predicts x₀ and samples only at 1 step; set it to 1")
    if not d.teacher_cfg and (d.w_min, d.w_max) != (0, 0):
        raise ConfigError(f"distill.teacher_cfg=false distils the unguided teacher (w = 0), but distill.w_min="
                          f"{d.w_min} and distill.w_max={d.w_max}: set both to 0")
    if v.num_inference_steps > d.num_ddim_timesteps:
        # LCMScheduler samples a subset of the N-step training grid: more steps than N fail at the first validation.
        raise ConfigError(f"validation.num_inference_steps={v.num_inference_steps} must be <= "
                          f"distill.num_ddim_timesteps={d.num_ddim_timesteps}")
    if v.every_n_steps > 0 and not (len(v.prompts) and len(v.seeds)):
        raise ConfigError(f"validation.every_n_steps={v.every_n_steps} needs validation.prompts and validation.seeds "
                          "(both non-empty); set validation.every_n_steps=0 to turn validation off")
    if cfg.data.streaming and cfg.data.source != "webdataset":
        raise ConfigError(f"data.streaming=true needs data.source=webdataset, not {cfg.data.source!r}")


def registry_choices() -> dict[str, tuple]:
    """The valid names of each config key that selects from a registry: that registry's keys (imported here, not at
    module level, so reading a config stays light)."""
    from .adversarial import D_LOSSES
    from .consistency import LOSS_WEIGHTINGS, LOSSES
    from .data import SOURCES
    from .models import PIPELINES
    from .objectives import ADD_WEIGHTINGS, OBJECTIVES
    from .solvers import SOLVERS

    return {"model.kind": tuple(PIPELINES), "data.source": tuple(SOURCES), "distill.solver": tuple(SOLVERS),
            "distill.loss": tuple(LOSSES), "distill.loss_weighting": tuple(LOSS_WEIGHTINGS),
            "distill.objective": OBJECTIVES, "adversarial.loss": tuple(D_LOSSES),
            "adversarial.distill_weighting": tuple(ADD_WEIGHTINGS)}


def _validate(cfg) -> None:
    """Check named choices, ranges and cross-field sanity; every message names the key."""
    reg = registry_choices()
    choices: dict[str, Any] = {**reg, **CHOICES}
    for key, valid in choices.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and value not in valid:
            hint = " (in YAML, quote words like 'no': unquoted they read as booleans)" if value in ("True", "False") else ""
            raise ConfigError(f"{key}={value!r} is not one of {list(valid)}{hint}")
    _check_ranges(cfg)
    _check_cross_fields(cfg)


def to_yaml(cfg) -> str:
    """The resolved config as YAML: what is written to the run folder and printed by --dry-run."""
    return OmegaConf.to_yaml(cfg, resolve=True)
