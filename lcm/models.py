"""Load teachers from a path or hub id, read their noise schedule, and wrap UNets as role callables.

Dtype policy (one place): frozen networks in the weight dtype (fp32 on CPU; fp16/bf16 follow mixed precision on GPU),
the VAE always fp32 for encoding (SDXL's VAE overflows in fp16), trainable parameters fp32, schedule tensors fp32.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from .guidance import w_embedding
from .lora import adapters_disabled
from .schedule import NoiseSchedule, alphas_cumprod_from_config

PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline}

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """Frozen-weight dtype that matches accelerate's mixed-precision mode."""
    return WEIGHT_DTYPES[mixed_precision]


def load_pipeline(kind: str, pretrained: str, torch_dtype=torch.float32, revision=None, variant=None):
    """The teacher pipeline via diffusers' own `from_pretrained` (a local folder, or a hub id when online)."""
    if kind not in PIPELINES:
        raise ValueError(f"unknown model.kind {kind!r}; valid: {sorted(PIPELINES)}")
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd15" else {}
    pipe = PIPELINES[kind].from_pretrained(pretrained, torch_dtype=torch_dtype, revision=revision, variant=variant,
                                           **extra)
    pipe.vae.to(torch.float32)  # fp32 VAE encode/decode, whatever the weight dtype
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe


def pipeline_class_of(pipe) -> type:
    """The pipeline's class, for class-level helpers such as `save_lora_weights`."""
    return type(pipe) if isinstance(pipe, DiffusionPipeline) else StableDiffusionXLPipeline


def noise_schedule_of(scheduler) -> NoiseSchedule:
    """Our NoiseSchedule from the teacher's scheduler config (its own betas: SD/SDXL scaled_linear, PixArt linear)."""
    c = scheduler.config
    return NoiseSchedule(alphas_cumprod_from_config(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end))


def unet_role(unet):
    """A diffusers UNet as a role callable `(z, t, cond, w=None) -> prediction`.

    `cond` holds `encoder_hidden_states` and, for SDXL, `text_embeds` and `time_ids`. `w` feeds the guidance
    embedding only when the UNet has one (`time_cond_proj_dim`); LoRA students have none and ignore it.
    """
    proj_dim = unet.config.time_cond_proj_dim if hasattr(unet, "config") else None

    def call(z, t, cond, w=None):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if "text_embeds" in cond else None
        timestep_cond = None
        if proj_dim is not None and w is not None:
            timestep_cond = w_embedding(w, proj_dim).to(device=z.device, dtype=z.dtype)
        dtype = next(unet.parameters()).dtype
        out = unet(z.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                   added_cond_kwargs=added, timestep_cond=timestep_cond).sample
        return out.float()

    return call


def base_role(unet):
    """The LCM-LoRA teacher: the same UNet with its adapters disabled, as a `(z, t, cond) -> prediction` callable."""
    inner = unet_role(unet)

    def call(z, t, cond, w=None):
        with adapters_disabled(unet):
            return inner(z, t, cond)

    return call
