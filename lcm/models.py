"""Load teachers from a path or hub id, read their noise schedule, and wrap UNets as role callables.

Dtype policy (one place): frozen networks in the weight dtype (fp32 on CPU; fp16/bf16 follow mixed precision on GPU),
the VAE always fp32 for encoding (SDXL's VAE overflows in fp16), trainable parameters fp32, schedule tensors fp32.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from .guidance import w_embedding
from .ema import ema_update_
from .lora import adapters_disabled, swapped_weights
from .schedule import NoiseSchedule, alphas_cumprod_from_config

PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline}

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
    pipe = PIPELINES[kind].from_pretrained(pretrained, torch_dtype=torch_dtype, revision=revision, variant=variant,
                                           use_safetensors=True, **extra, **{name: None for name in without})
    if pipe.vae is not None:
        pipe.vae.to(torch.float32)  # fp32 VAE encode/decode, whatever the weight dtype
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe


def noise_schedule_of(scheduler) -> NoiseSchedule:
    """Our NoiseSchedule from the teacher's scheduler config (its own betas: SD/SDXL scaled_linear, PixArt linear)."""
    c = scheduler.config
    return NoiseSchedule(alphas_cumprod_from_config(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end))


def unet_role(unet):
    """A diffusers UNet as a role callable `(z, t, cond, w=None) -> prediction`.

    `cond` holds `encoder_hidden_states` and, for SDXL, `text_embeds` and `time_ids`. `w` feeds the guidance
    embedding only when the UNet has one (`time_cond_proj_dim`); LoRA students have none and ignore it.
    """
    # Read the config through a DDP/FSDP wrapper: a wrapped student must still receive its w-embedding.
    proj_dim = getattr(getattr(unet, "module", unet), "config", None)
    proj_dim = getattr(proj_dim, "time_cond_proj_dim", None)

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


def student_from_teacher(teacher, w_embed_dim: int = 256):
    """Full-LCD student: the teacher's UNet plus a guidance-embedding input (`time_cond_proj_dim`), in fp32.

    The new projection `time_embedding.cond_proj` is zero-initialised, so at step 0 the student's output equals the
    teacher's for every w (a randomly initialised projection would start the student worse than its teacher).
    """
    from diffusers import UNet2DConditionModel

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

    def role(self, unet):
        """The target callable: the student's module evaluated with θ⁻ in place of θ."""
        inner = unet_role(unet)

        def call(z, t, cond, w=None):
            with swapped_weights(self.params, self.shadow):
                return inner(z, t, cond, w)

        return call
