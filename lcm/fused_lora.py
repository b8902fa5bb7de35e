"""PEFT LoRA layers evaluated as one linear / convolution with the effective weight W + s·B·A (issue #13 item 4).

PEFT computes a LoRA layer as `base(x) + s · B(A(x))`: three kernels, and for rank 32 on the mini teacher's 64–128
channels the two adapter kernels cost about half of the base one. The same function is `base(x; W + s·B·A)`: for a
linear layer B·A is a matrix product, for a convolution A is a k×k convolution into r channels and B a 1×1 one, so
their composition is the k×k kernel (B ⊗ A)[o, i] = Σ_r B[o, r] · A[r, i]. Building that weight costs one small
matrix product per layer and call; autograd then reaches A and B through it (dA = s·Bᵀ·dW, dB = s·dW·Aᵀ).

The fused forward is installed on a layer only where it is the same function:
- exactly one active adapter, a plain LoRA (no DoRA or other variant), no LoRA bias, no dropout;
- an `nn.Linear` without `fan_in_fan_out`, or an `nn.Conv2d` with groups 1, dilation 1, zero padding;
- adapter and base weights of one dtype (fp16 base weights with fp32 adapters would round the delta into fp16).
  `install(model, lowp=True)` (`lora.fused_lowp`) fuses those too: W + s·B·A is formed in fp32 and rounded once to the
  base dtype, so a delta below half a bf16 step of W (W's magnitude / 256) is not in the forward. That is not PEFT's
  function; it is opt-in, and its quality was measured (README, issue #13 speed).
Every other layer keeps PEFT's forward, and the counts are logged. The layer also falls back at call time when its
adapters are disabled (the LCM-LoRA teacher), merged, or asked for mixed adapters. Outputs and gradients equal PEFT's
to float rounding (tests/test_fused_lora.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer

logger = logging.getLogger(__name__)

_ORIGINAL = "_lcm_peft_forward"  # the instance attribute holding PEFT's bound forward while fused


def ineligible_reason(layer, lowp: bool = False) -> str | None:
    """Why `layer` cannot take the fused forward, or None when it can (`lowp`: low-precision base weights may)."""
    if type(layer) not in (lora_layer.Linear, lora_layer.Conv2d):
        return f"layer type {type(layer).__name__}"
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters"
    name = adapters[0]
    base = layer.get_base_layer()
    checks = {
        "adapter variant (DoRA)": name in getattr(layer, "lora_variant", {}),
        "LoRA bias": layer.lora_bias.get(name, False),
        "dropout": not isinstance(layer.lora_dropout[name], torch.nn.Identity),
        "dtype": layer.lora_A[name].weight.dtype != base.weight.dtype and not (
            lowp and base.weight.dtype in (torch.bfloat16, torch.float16)),
    }
    if isinstance(base, torch.nn.Linear):
        checks["fan_in_fan_out"] = getattr(layer, "fan_in_fan_out", False)
    elif isinstance(base, torch.nn.Conv2d):
        a = layer.lora_A[name]
        checks["conv geometry"] = (base.groups != 1 or base.dilation != (1, 1) or base.padding_mode != "zeros"
                                   or a.stride != base.stride or a.padding != base.padding)
    else:
        return f"base layer {type(base).__name__}"
    failed = [k for k, bad in checks.items() if bad]
    return failed[0] if failed else None


def effective_weight(layer, name: str) -> torch.Tensor:
    """W + s·B·A for adapter `name`, differentiable in A and B (a convolution's kernel composed as described above).
    Formed in the adapters' dtype with autocast off, then rounded once to W's dtype (a no-op unless `lowp`)."""
    base = layer.get_base_layer()
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    w = base.weight
    with torch.autocast(w.device.type, enabled=False):
        fused = torch.addmm(w.flatten(1).to(a.dtype), b.flatten(1), a.flatten(1), alpha=layer.scaling[name])
    return fused.view_as(w).to(w.dtype)


def _fused_forward(layer, name: str, peft_forward):
    base = layer.get_base_layer()
    conv = isinstance(base, torch.nn.Conv2d)

    def forward(x, *args, **kwargs):
        if (layer.disable_adapters or layer.merged or args or kwargs
                or list(layer.active_adapters) != [name]):
            return peft_forward(x, *args, **kwargs)
        w = effective_weight(layer, name)
        return base._conv_forward(x, w, base.bias) if conv else F.linear(x, w, base.bias)

    return forward


def install(model, lowp: bool = False) -> Counter:
    """Give every eligible PEFT LoRA layer of `model` the fused forward; returns counts by outcome ("fused" or why
    not). Idempotent; `uninstall` restores PEFT's forward. `lowp`: fuse low-precision base weights too (see above)."""
    outcomes: Counter = Counter()
    for module in model.modules():
        if not isinstance(module, lora_layer.LoraLayer):
            continue
        if hasattr(module, _ORIGINAL):
            outcomes["fused"] += 1
            continue
        reason = ineligible_reason(module, lowp)
        if reason is not None:
            outcomes[reason] += 1
            continue
        name = next(a for a in module.active_adapters if a in module.lora_A)
        peft_forward = module.forward
        setattr(module, _ORIGINAL, peft_forward)
        module.forward = _fused_forward(module, name, peft_forward)
        outcomes["fused"] += 1
    kept = {k: v for k, v in outcomes.items() if k != "fused"}
    if kept:
        logger.info("fused LoRA forward on %d layer(s); PEFT's forward kept on %s", outcomes["fused"],
                    ", ".join(f"{v} ({k})" for k, v in sorted(kept.items())))
    return outcomes


def uninstall(model) -> None:
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            del module.forward  # the instance attribute: the class's (PEFT's) forward shows through again
            delattr(module, _ORIGINAL)


@contextlib.contextmanager
def fused(model, lowp: bool = False) -> Iterator[Counter]:
    """`install` for the duration of the block."""
    try:
        yield install(model, lowp)
    finally:
        uninstall(model)
