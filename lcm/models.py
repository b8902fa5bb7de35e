"""Load teachers from a path or hub id, read their noise schedule, and wrap denoisers as role callables.

The denoiser is the pipeline's `unet` (SDXL, SSD-1B, SD1.5/2.x) or its `transformer` (PixArt-α); everything past this
module sees only role callables `(z, t, cond, w=None) -> prediction`, so the loss never knows which backbone it trains.

Dtype policy (one place): frozen networks in the weight dtype (fp32 on CPU; fp16/bf16 follow mixed precision on GPU),
the VAE always fp32 for encoding (SDXL's VAE overflows in fp16), trainable parameters fp32, schedule tensors fp32.
"""

from __future__ import annotations

import copy
import logging

import torch
from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from .guidance import w_embedding
from .ema import ema_update_
from .lora import adapters_disabled, swapped_weights
from .schedule import NoiseSchedule, alphas_cumprod_from_config

logger = logging.getLogger(__name__)

PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline, "pixart": PixArtAlphaPipeline}

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """Frozen-weight dtype that matches accelerate's mixed-precision mode."""
    return WEIGHT_DTYPES[mixed_precision]


# What turns data into model inputs (and is all a latent cache replaces): the VAE, text encoders and tokenizers.
ENCODER_PREFIXES = ("vae", "text_encoder", "tokenizer")


def module_names(kind: str) -> tuple[str, ...]:
    """The pipeline components of `kind` (modules, tokenizers, scheduler), as its constructor names them."""
    cls = PIPELINES[kind]
    return tuple(cls._get_signature_keys(cls)[0])


def encoder_names(kind: str) -> tuple[str, ...]:
    """The components of `kind` that encode images or text (`vae`, `text_encoder_2`, `tokenizer`, …)."""
    return tuple(n for n in module_names(kind) if n.startswith(ENCODER_PREFIXES))


def load_pipeline(kind: str, pretrained: str, torch_dtype=torch.float32, revision=None, variant=None,
                  without: tuple[str, ...] = ()):
    """The teacher pipeline via diffusers' own `from_pretrained` (a local folder, or a hub id when online).

    Components named in `without` are not loaded (left None): training from a latent cache needs no encoders.
    """
    if kind not in PIPELINES:
        raise ValueError(f"unknown model.kind {kind!r}; valid: {sorted(PIPELINES)}")
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd15" else {}
    # `dtype` (diffusers >= 0.36 deprecates `torch_dtype`), per component: the VAE loads in fp32 for encode/decode
    # whatever the weight dtype. Loading it so, rather than casting after, keeps diffusers' keep-in-fp32 logic intact.
    pipe = PIPELINES[kind].from_pretrained(pretrained, dtype={"default": torch_dtype, "vae": torch.float32},
                                           revision=revision, variant=variant, use_safetensors=True, **extra,
                                           **{name: None for name in without})
    if pipe.vae is not None and pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


def denoiser_name(pipe) -> str:
    """The pipeline component that denoises: "transformer" (PixArt) or "unet"."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def denoiser_of(pipe):
    return getattr(pipe, denoiser_name(pipe))


def _config_of(model):
    """The diffusers config, read through a DDP/FSDP wrapper (`.module`)."""
    return getattr(getattr(model, "module", model), "config", None)


def is_transformer(model) -> bool:
    """PixArt's DiT (it consumes T5 captions through `caption_channels`) rather than a UNet."""
    return "caption_channels" in (_config_of(model) or {})


def noise_schedule_of(scheduler) -> NoiseSchedule:
    """Our NoiseSchedule from the teacher's scheduler config (its own betas: SD/SDXL scaled_linear, PixArt linear)."""
    c = scheduler.config
    return NoiseSchedule(alphas_cumprod_from_config(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end))


def denoiser_role(model):
    """A diffusers UNet or PixArt transformer as a role callable `(z, t, cond, w=None) -> prediction`."""
    return _transformer_role(model) if is_transformer(model) else _unet_role(model)


def _transformer_role(transformer):
    """PixArt: `cond` holds T5 `encoder_hidden_states` and their `encoder_attention_mask` (padding is masked out of
    cross-attention), plus `resolution`/`aspect_ratio` for the 1024-px model's micro-conditioning. The model has no
    guidance-embedding input, so `w` is ignored (fixed-w or w-averaged distillation). With learned sigma the output
    carries 2C channels; the prediction is the first C (what the pipeline keeps too)."""
    config = _config_of(transformer)
    learned_sigma = config.out_channels == 2 * config.in_channels

    def call(z, t, cond, w=None):
        dtype = next(transformer.parameters()).dtype
        added = {k: (cond[k].to(dtype) if k in cond else None) for k in ("resolution", "aspect_ratio")}
        out = transformer(z.to(dtype), encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                          encoder_attention_mask=cond["encoder_attention_mask"], timestep=t,
                          added_cond_kwargs=added).sample
        return (out[:, : z.shape[1]] if learned_sigma else out).float()

    return call


def _unet_role(unet):
    """UNet: `cond` holds `encoder_hidden_states` and, for SDXL, `text_embeds` and `time_ids`. `w` feeds the guidance
    embedding only when the UNet has one (`time_cond_proj_dim`); LoRA students have none and ignore it."""
    # Read the config through a DDP/FSDP wrapper: a wrapped student must still receive its w-embedding.
    proj_dim = getattr(_config_of(unet), "time_cond_proj_dim", None)

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


def base_role(model):
    """The LCM-LoRA teacher: the same network with its adapters disabled, as a `(z, t, cond) -> prediction` callable."""
    inner = denoiser_role(model)

    def call(z, t, cond, w=None):
        with adapters_disabled(model):
            return inner(z, t, cond)

    return call


def student_from_teacher(teacher, w_embed_dim: int = 256):
    """Full-LCD student: the teacher's UNet plus a guidance-embedding input (`time_cond_proj_dim`), in fp32.

    The new projection `time_embedding.cond_proj` is zero-initialised, so at step 0 the student's output equals the
    teacher's for every w (a randomly initialised projection would start the student worse than its teacher).
    A PixArt transformer has no such input (and the stock pipeline would not feed one): its student is a plain fp32
    copy, distilled at a fixed w (PixArt-δ) or averaged over the w range.
    """
    from diffusers import UNet2DConditionModel

    if is_transformer(teacher):
        logger.info("PixArt student: no guidance-embedding input; w acts through the teacher's CFG only")
        student = copy.deepcopy(teacher)
        return student.to(device=teacher.device, dtype=torch.float32).train().requires_grad_(True)

    student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": w_embed_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise ValueError(f"student/teacher mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(device=teacher.device, dtype=torch.float32).train().requires_grad_(True)


class EMATarget:
    """θ⁻ as shadow tensors of the trainable parameters: the target runs on the student's module with θ⁻ swapped in.

    Works for LoRA adapters (a few MB) and whole UNets alike; `device="cpu"` keeps the shadow off the accelerator at
    the cost of a copy in and out per target evaluation.
    """

    def __init__(self, named_params: dict, decay: float, device=None):
        self.names, self.params, self.decay = list(named_params), list(named_params.values()), decay
        self.shadow = [p.detach().to(device or p.device, copy=True) for p in self.params]

    def update(self) -> None:
        """θ⁻ ← μ θ⁻ + (1 − μ) θ, after each optimiser step."""
        ema_update_(self.shadow, [p.detach().to(s.device) for p, s in zip(self.params, self.shadow)], self.decay)

    def state(self) -> dict:
        """Shadow tensors keyed by parameter name, so a checkpoint never depends on parameter order."""
        return {f"ema.{n}": t for n, t in zip(self.names, self.shadow)}

    def load(self, state: dict) -> None:
        for n, t in zip(self.names, self.shadow):
            t.copy_(state[f"ema.{n}"])

    def role(self, model):
        """The target callable: the student's module evaluated with θ⁻ in place of θ."""
        inner = denoiser_role(model)

        def call(z, t, cond, w=None):
            with swapped_weights(self.params, self.shadow):
                return inner(z, t, cond, w)

        return call
