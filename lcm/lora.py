"""LoRA on the UNet through PEFT: add adapters, switch roles with named context managers, save and load.

The teacher of LCM-LoRA is the same UNet with its adapters disabled; the target is the same UNet with the EMA adapter
weights swapped in. Both are context managers so no caller toggles adapters inline.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict


def add_lora(unet, rank: int, alpha: float, target_modules: Iterable[str], dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Attach a PEFT LoRA adapter ("default") to a frozen UNet; returns the trainable LoRA parameters, kept in fp32."""
    unet.requires_grad_(False)
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                            target_modules=list(target_modules))
    try:
        unet.add_adapter(config)
    except ValueError as err:  # PEFT's message does not name our config key
        raise ValueError(f"lora.target_modules={list(target_modules)}: {err}") from err
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no UNet module matched lora.target_modules={list(target_modules)}")
    for p in params:
        # Important: adapters train in fp32 even when the frozen base runs in fp16/bf16 (mixed-precision safety).
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextlib.contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """Run the base model: the LCM-LoRA teacher is the UNet with its adapters switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@contextlib.contextmanager
def swapped_weights(params: list[torch.nn.Parameter], replacement: list[torch.Tensor]) -> Iterator[None]:
    """Temporarily point `params` at `replacement` values (e.g. EMA adapters for the target), restoring after.

    Important: the swap rebinds `p.data` instead of copying into `p`. The student's forward has already saved these
    parameters for its backward pass; an in-place copy would bump their version counters and make that backward fail
    ("modified by an inplace operation"). Rebinding leaves the saved tensors untouched, and the originals are back
    before any backward runs.
    """
    saved = [p.data for p in params]
    for p, r in zip(params, replacement):
        p.data = r.detach().to(device=p.device, dtype=p.dtype)
    try:
        yield
    finally:
        for p, s in zip(params, saved):
            p.data = s


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter tensors in PEFT key format (`…to_q.lora_A.weight`), contiguous, on CPU.

    Kept in PEFT format on purpose: diffusers' `convert_state_dict_to_diffusers` rewrites only the attention keys to
    the legacy `.lora.down` form, and the loader then silently skipped them (caught by the reload test).
    """
    state = get_peft_model_state_dict(unet)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def lora_metadata(unet) -> dict:
    """PEFT adapter config (rank, alpha, targets) saved beside the weights so loaders rebuild the same adapter."""
    return unet.peft_config["default"].to_dict()


def save_lora(unet, out_dir, pipeline_cls) -> None:
    """Write `pytorch_lora_weights.safetensors` so `pipe.load_lora_weights(out_dir)` works unchanged."""
    pipeline_cls.save_lora_weights(out_dir, unet_lora_layers=lora_state_dict(unet),
                                   unet_lora_adapter_metadata=lora_metadata(unet), safe_serialization=True)


def load_lora_into_training_unet(unet, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors saved by `get_peft_model_state_dict` back into a UNet carrying the "default" adapter."""
    result = set_peft_model_state_dict(unet, state_dict, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"unexpected LoRA keys when resuming, first: {unexpected[0]}")
