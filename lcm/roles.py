"""The role callables the losses receive (DESIGN.md §1): `student`, `target`, `teacher`, each `(z, t, cond, w=None)
-> prediction`, so a loss never knows whether it trains a UNet, PixArt's transformer, LoRA adapters or a whole copy.

- `denoiser_role(model)`: a diffusers UNet or PixArt transformer as a callable (the student; the full-LCD teacher).
- `base_role(model)`: the same network with its LoRA adapters disabled (the LCM-LoRA teacher).
- `target_role(ema, model)`: the network evaluated with the EMA weights θ⁻ swapped in (the target).
Switching roles goes through named context managers (`adapters_disabled`, `EMATarget.swapped_in`), never inline.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from peft.tuners.tuners_utils import BaseTunerLayer

from .ema import EMATarget
from .guidance import w_embedding
from .models import config_of, is_transformer


def _set_adapters_enabled(model, enabled: bool) -> None:
    # What diffusers' disable_adapters/enable_adapters do, for any module tree carrying PEFT layers.
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled=enabled)


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Run the base model: the LCM-LoRA teacher is the denoiser with its adapters switched off."""
    _set_adapters_enabled(model, False)
    try:
        yield
    finally:
        _set_adapters_enabled(model, True)


def denoiser_role(model):
    """A diffusers UNet or PixArt transformer as a role callable `(z, t, cond, w=None) -> prediction`."""
    return _transformer_role(model) if is_transformer(model) else _unet_role(model)


def _transformer_role(transformer):
    """PixArt: `cond` holds T5 `encoder_hidden_states` and their `encoder_attention_mask` (padding is masked out of
    cross-attention), plus `resolution`/`aspect_ratio` for the 1024-px model's micro-conditioning. The model has no
    guidance-embedding input, so `w` is ignored (fixed-w or w-averaged distillation). With learned sigma the output
    carries 2C channels; the prediction is the first C (what the pipeline keeps too)."""
    config = config_of(transformer)
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
    proj_dim = getattr(config_of(unet), "time_cond_proj_dim", None)

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


def target_role(ema: EMATarget, model):
    """The target θ⁻: `model` (the student's module) evaluated with the EMA shadow in place of its trained tensors."""
    inner = denoiser_role(model)

    def call(z, t, cond, w=None):
        with ema.swapped_in():
            return inner(z, t, cond, w)

    return call
