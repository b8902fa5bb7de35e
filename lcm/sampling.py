"""Build a few-step pipeline from a base model + LoRA(s) or a distilled UNet, and sample with one generator per image."""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import DiffusionPipeline, LCMScheduler
from PIL import Image

from .constants import NUM_DDIM_TIMESTEPS, TIMESTEP_SCALING
from .lora import (PEFT_CONFIG_FILE, PEFT_KEY_PREFIX, PEFT_WEIGHTS_FILE, check_lora_landed, check_lora_matches,
                   load_pipeline_lora)

from .models import DTYPES, denoiser_name, load_pretrained
from .objectives import base_objective
from .presets import build_scheduler, get_preset, stock_eta, stock_timesteps

logger = logging.getLogger("lcm")


def auto_device_dtype(device: Optional[str] = None, dtype: Optional[str] = None) -> tuple[str, torch.dtype]:
    """cuda → bf16 (fp16 where bf16 is unsupported), otherwise cpu → fp32; explicit choices win."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)} or auto")
        return device, DTYPES[dtype]
    if device.startswith("cuda"):
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def parse_seeds(spec: str) -> list[int]:
    """'0-7' → 0..7 inclusive; '1,5,9' → those; '3' → [3]."""
    seeds: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            if int(hi) < int(lo):
                raise ValueError(f"bad seed range {part!r}")
            seeds.extend(range(int(lo), int(hi) + 1))
        elif part:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"no seeds in {spec!r}")
    return seeds


def lcm_scheduler_for(base_config, original_inference_steps: int = NUM_DDIM_TIMESTEPS,
                      timestep_scaling: float = TIMESTEP_SCALING) -> LCMScheduler:
    """LCMScheduler on the teacher's betas, with the distillation grid N stored as `original_inference_steps`."""
    # Keep only what LCMScheduler understands (the teacher may carry Euler/DDIM-only keys), so nothing is ignored
    # silently; clip_sample is forced off: clipping x̂₀ to [-1, 1] wrecks latent-space sampling.
    accepted = set(inspect.signature(LCMScheduler.__init__).parameters)
    config = {k: v for k, v in dict(base_config).items() if k in accepted}
    config.update(original_inference_steps=original_inference_steps, timestep_scaling=timestep_scaling,
                  clip_sample=False)
    return LCMScheduler(**config)


# The sampling preset each distillation objective trains its student for: consistency students sample with
# LCMScheduler on the trained grid; ADD's with Euler ancestral on trailing timesteps (at 4 steps exactly ADD's student
# timesteps 999/749/499/249), no CFG.
OBJECTIVE_PRESETS = {"lcd": "lcm", "add": "turbo", "pcm": "pcm", "tcd": "tcd", "lightning": "lightning"}
# an `*_adv` objective (lcd_adv, pcm_adv, tcd_adv) samples like its base objective (objectives.base_objective)


def objective_preset(distill_cfg) -> str:
    """The preset a student trained with `distill_cfg` samples with: OBJECTIVE_PRESETS, except a Lightning run whose
    last stage is an x₀-predicting 1-step stage (`lightning-1step`: the scheduler reads the output as a sample)."""
    objective = distill_cfg.get("objective", "lcd")  # runs from before objectives existed: lcd
    if objective == "lightning" and distill_cfg.stages[-1] == 1 and distill_cfg.x0_one_step:
        return "lightning-1step"
    return OBJECTIVE_PRESETS[base_objective(objective)]


def student_scheduler_for(distill_cfg, base_config):
    """The scheduler a student trained with `distill_cfg` samples with, on the teacher's betas: what validation uses
    and what the run exports, so `lcm sample --preset <OBJECTIVE_PRESETS[objective]>` repeats the trainer's sampling."""
    preset = objective_preset(distill_cfg)
    if preset == "lcm":
        return lcm_scheduler_for(base_config, distill_cfg.num_ddim_timesteps, distill_cfg.timestep_scaling)
    if preset == "tcd":  # TCD samples from the trained grid, like LCM
        return build_scheduler(preset, {**base_config, "original_inference_steps": distill_cfg.num_ddim_timesteps,
                                        "timestep_scaling": distill_cfg.timestep_scaling})
    return build_scheduler(preset, base_config)


def mix_rule(distill_cfg) -> Optional[str]:
    """"tcd-mix-auto" for a TCD student trained with a clean-end share (`distill.tcd_clean_share` > 0): it samples by
    that step-count rule, in `lcm sample` and (through `eta` alone) in a stock pipeline. None for any other student."""
    tcd = base_objective(distill_cfg.get("objective", "lcd")) == "tcd"
    return "tcd-mix-auto" if tcd and distill_cfg.get("tcd_clean_share", 0) > 0 else None


def student_eta(distill_cfg, steps: Optional[int] = None) -> Optional[float]:
    """The `eta` the objective's exported sampler is called with at `steps` (TCD's gamma), or None: a TCD student with
    a clean-end share takes its card's rule by step count (`stock_eta` of its `mix_rule`), any other TCD student its
    `tcd_gamma` (so does the clean-share one when no step count is given)."""
    rule = mix_rule(distill_cfg)
    if rule is not None and steps is not None:
        return stock_eta(rule, steps)
    tcd = base_objective(distill_cfg.get("objective", "lcd")) == "tcd"
    return distill_cfg.tcd_gamma if tcd else get_preset(objective_preset(distill_cfg)).eta


def student_timesteps(distill_cfg, steps: Optional[int], num_train_timesteps: int = 1000) -> Optional[list[int]]:
    """The `timesteps=` the exported sampler is called with at `steps`, beside `student_eta`: a clean-share TCD run's
    rule spreads its steps over the trained grid from 7 steps (`stock_timesteps`); None = the scheduler's own."""
    rule = mix_rule(distill_cfg)
    if rule is None or steps is None:
        return None
    return stock_timesteps(rule, steps, distill_cfg.num_ddim_timesteps, num_train_timesteps)


def resolve_lora_dir(path: str) -> Path:
    """A LoRA given as a run folder (its `final/`), a folder with the weights (diffusers' `pytorch_lora_weights.
    safetensors`, or PEFT's `adapter_config.json` for PixArt), or the .safetensors file itself."""
    p = Path(path)
    for folder in (p / "final", p):
        if any((folder / name).is_file() for name in ("pytorch_lora_weights.safetensors", PEFT_CONFIG_FILE)):
            return folder
    if p.is_file():
        return p
    raise FileNotFoundError(f"no LoRA weights at {path!r} (expected a run folder, a folder with "
                            f"pytorch_lora_weights.safetensors or {PEFT_CONFIG_FILE}, or a .safetensors file)")


def resolve_student_dir(path: str) -> Path:
    """A full-LCD student given as a run folder (`final/unet` or `final/transformer`), its `final/` folder, or the
    model folder itself."""
    p = Path(path)
    for candidate in (p / "final" / "unet", p / "final" / "transformer", p / "unet", p / "transformer", p):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no diffusers model at {path!r} (expected a train_lcd.py run folder, its final/ folder, "
                            "or a folder with config.json + diffusion_pytorch_model.safetensors)")


def load_pipeline_for_sampling(base: str, loras: Sequence[tuple[str, float]] = (), fuse: bool = False,
                               device: Optional[str] = None, dtype: Optional[str] = None, preset: str = "lcm",
                               student: Optional[str] = None, config_dir: Optional[str] = None):
    """Base pipeline (a folder, a hub id, or a single-file checkpoint with its `config_dir`) + LoRA(s) or a full-LCD
    `student` (it replaces the base's UNet/transformer) + the preset's scheduler (LCMScheduler by default), on device
    and dtype."""
    get_preset(preset)  # an unknown preset fails here, before any model is loaded
    if student and loras:
        raise ValueError("give either a full-LCD student or LoRA(s), not both")
    device, torch_dtype = auto_device_dtype(device, dtype)
    pipe = load_pretrained(DiffusionPipeline, base, config_dir, torch_dtype=torch_dtype)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    scheduler_config = pipe.scheduler.config
    if student:
        folder, name = resolve_student_dir(student), denoiser_name(pipe)
        setattr(pipe, name, type(getattr(pipe, name)).from_pretrained(str(folder), dtype=torch_dtype))
        scheduler_config = _saved_scheduler_config(folder.parent) or scheduler_config
    if loras and not hasattr(pipe, "load_lora_weights"):  # PixArt: no diffusers LoRA loader
        scheduler_config = _load_peft_lora(pipe, loras) or scheduler_config
        loras = ()
    names, weights = [], []
    for i, (path, weight) in enumerate(loras):
        lora = resolve_lora_dir(path)
        name = f"lora{i}"
        # Any format diffusers reads (ours, kohya/SGM, diffusers'); refused if it fits another base or half-loads.
        load_pipeline_lora(pipe, lora, name)
        if i == 0:
            scheduler_config = _saved_scheduler_config(lora) or scheduler_config
        names.append(name)
        weights.append(weight)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
        if fuse:
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
            pipe.unload_lora_weights()  # the weights are now inside the UNet; drop the adapter layers
    # The first LoRA's saved LCMScheduler config (if any) carries the distillation grid N; every preset keeps its betas.
    pipe.scheduler = build_scheduler(preset, scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _saved_scheduler_config(lora: Path):
    """The LCMScheduler config a run saved beside its LoRA (it carries the distillation grid N), or None."""
    saved = lora / "scheduler" / "scheduler_config.json"
    return LCMScheduler.load_config(str(saved.parent)) if lora.is_dir() and saved.is_file() else None


def guidance_warnings(normal_cfg: Sequence[bool | None], guidance_scale: float, negative_prompt) -> list[str]:
    """What `lcm sample` warns about the guidance, knowing each loaded student's kind from its model card (True:
    normal CFG, False: guidance distilled in, None: unknown)."""
    out = []
    if any(k is True for k in normal_cfg) and guidance_scale <= 1.0:
        out.append(f"a normal-CFG student (trained with distill.teacher_cfg=false) expects guidance_scale 3–8; at "
                   f"{guidance_scale} it samples unguided" + (" and the negative prompt does nothing" if negative_prompt
                                                             else ""))
    elif negative_prompt and guidance_scale <= 1.0:
        distilled = any(k is False for k in normal_cfg)
        out.append("a negative prompt has no effect with guidance_scale <= 1 (no unconditional branch is run)"
                   + ("; this student has the guidance distilled in, so guidance above 2 over-saturates: for real "
                      "negative prompts train a normal-CFG one (distill.teacher_cfg=false)" if distilled else ""))
    return out


def saved_scheduler(lora: Path):
    """The scheduler a run saved beside its LoRA, as the class it was saved as (LCMScheduler for consistency
    students, Euler ancestral for ADD), or None when the folder has none."""
    import diffusers

    config = _saved_scheduler_config(lora)
    if config is None:
        return None
    return getattr(diffusers, config["_class_name"]).from_config(config)


def _run_distill_config(path: Path):
    """(config.yaml, its `distill` section) of the run a LoRA or student at `path` came from: the first config.yaml in
    the folder given, its parent or grandparent (a run keeps it beside `final/`); None when there is none."""
    from omegaconf import OmegaConf

    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            distill = OmegaConf.load(folder / "config.yaml").get("distill")
            return (folder / "config.yaml", distill) if distill is not None else None
    return None


def saved_eta(student: Path, steps: Optional[int] = None) -> Optional[float]:
    """The `eta` the run's exported sampler takes at `steps` (`student_eta`: TCD's gamma, or a clean-share run's rule by
    step count), read from the `config.yaml` beside its `final/` folder (or in the folder given); None when there is
    no config or the objective's sampler takes none."""
    found = _run_distill_config(student)
    return None if found is None else student_eta(found[1], steps)


def saved_timesteps(student: Path, steps: int, num_train_timesteps: int = 1000) -> Optional[list[int]]:
    """`student_timesteps` of the run whose `config.yaml` lies beside `student`'s `final/` (None without one)."""
    found = _run_distill_config(student)
    return None if found is None else student_timesteps(found[1], steps, num_train_timesteps)


def saved_preset(path: Path) -> Optional[tuple[str, Optional[float], Path]]:
    """(preset, eta, config file) the run that made the LoRA or student at `path` validated with: a TCD-LoRA's run →
    ("tcd", its gamma), or ("tcd-mix-auto", None) when it trained with `distill.tcd_clean_share` > 0 (that preset's
    rule sets gamma by step count), a Lightning run → "lightning" (or "lightning-1step"), an LCM run → "lcm"; None
    when no run config is found (a LoRA file from elsewhere)."""
    found = _run_distill_config(path)
    if found is None:
        return None
    config, distill = found
    rule = mix_rule(distill)
    if rule is not None:
        return rule, None, config
    return objective_preset(distill), student_eta(distill), config


def _load_peft_lora(pipe, loras: Sequence[tuple[str, float]]):
    """PixArt: one LoRA in PEFT's folder format, scaled by its weight and merged into the transformer (which stays a
    plain `PixArtTransformer2DModel`); returns the run's saved scheduler config, if any."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    if len(loras) > 1:
        raise ValueError(f"{type(pipe).__name__} has no diffusers LoRA loader, so LoRAs cannot be stacked; give one")
    (path, weight), = loras
    lora = resolve_lora_dir(path)
    if not (lora.is_dir() and (lora / PEFT_CONFIG_FILE).is_file()):
        raise ValueError(f"{path}: {type(pipe).__name__} loads LoRAs in PEFT's folder format ({PEFT_CONFIG_FILE} + "
                         f"{PEFT_WEIGHTS_FILE}), as train_lcm_lora.py writes them for PixArt")
    state = load_file(str(lora / PEFT_WEIGHTS_FILE))
    check_lora_matches(pipe.transformer, {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in state.items()})
    model = PeftModel.from_pretrained(pipe.transformer, str(lora))
    check_lora_landed(state, [model], "default", lora / PEFT_WEIGHTS_FILE)  # before merging hides what landed
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.scale_layer(weight)
    pipe.transformer = model.merge_and_unload()
    return _saved_scheduler_config(lora)


def img2img_steps(steps: int, strength: float) -> int:
    """Denoising steps an img2img run makes: int(steps × strength), diffusers' own formula; < 1 is an error."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    # The img2img pipelines build the full `steps` schedule and run only its last int(steps × strength) entries
    # (get_timesteps); with LCM's 1–8 steps a low strength easily leaves none, which diffusers reports only after
    # loading every model. Mirror the formula exactly so this check and the pipeline always agree.
    n = min(int(steps * strength), steps)
    if n < 1:
        raise ValueError(f"img2img with {steps} steps at strength {strength} makes int({steps} × {strength}) = 0 "
                         f"denoising steps; raise --steps to at least {math.ceil(1 / strength)} or raise --strength")
    return n


def load_init_image(path, height: Optional[int] = None, width: Optional[int] = None) -> Image.Image:
    """The img2img start image as RGB, resized to (width, height) when given (img2img keeps its input's size)."""
    image = Image.open(path).convert("RGB")
    if height or width:
        image = image.resize((width or image.width, height or image.height), Image.BICUBIC)
    return image


def img2img_pipeline(pipe):
    """The image-to-image pipeline on the same components (UNet with its LoRAs, scheduler, VAE): no second load."""
    from diffusers import AutoPipelineForImage2Image

    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    return i2i


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 4, guidance_scale: float = 1.0,
             height: Optional[int] = None, width: Optional[int] = None, negative_prompt: Optional[str] = None,
             batch_size: int = 8, eta: Optional[float] = None, init_image: Optional[Image.Image] = None,
             strength: float = 1.0, normal_cfg: Sequence[bool | None] = (),
             timesteps: Optional[Sequence[int]] = None) -> list[Image.Image]:
    """prompt × seed images, row-major; image (p, s) comes from its own generator seeded with s, whatever the batching.
    `normal_cfg`: each loaded student's kind (`lcm.export.is_normal_cfg`), for the guidance warnings. `timesteps`:
    the list to walk instead of the scheduler's own for `steps` (a clean-share TCD run's spread steps).

    With `init_image`, `pipe` must be an img2img pipeline (see `img2img_pipeline`); the output has the image's size.
    """
    if init_image is not None:
        img2img_steps(steps, strength)
    for warning in guidance_warnings(normal_cfg, guidance_scale, negative_prompt):
        logger.warning(warning)
    jobs = [(p, s) for p in prompts for s in seeds]
    accepted = inspect.signature(pipe.__call__).parameters
    images: list[Image.Image] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]
        kwargs = dict(prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=gens, output_type="pil")
        if init_image is not None:  # img2img takes its size from the image and has no height/width arguments
            kwargs.update(image=[init_image] * len(chunk), strength=strength)
        else:
            kwargs.update(height=height, width=width)
            if height and "use_resolution_binning" in accepted:
                kwargs["use_resolution_binning"] = False  # PixArt: honour the size asked for, not the nearest bin
        if "clean_caption" in accepted:  # PixArt: prompts as training encoded them (and no bs4/ftfy needed)
            kwargs["clean_caption"] = False
        if eta is not None:  # e.g. TCD's gamma: the pipeline's own default (0.0) would override the scheduler's
            kwargs["eta"] = eta
        if timesteps is not None:
            kwargs["timesteps"] = list(timesteps)
        if negative_prompt:
            kwargs["negative_prompt"] = [negative_prompt] * len(chunk)
        images.extend(pipe(**kwargs).images)
    return images


def image_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Paste images into a rows × cols grid (row-major)."""
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
