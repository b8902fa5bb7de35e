"""bf16 / fp16 training on a CPU: the two kernels whose low-precision CPU versions are slow run another way (issue #13
item 4).

Under `train.mixed_precision=bf16` the frozen weights are bf16 and autocast runs convolutions and matrix products in
bf16, which a CPU with AVX-512 BF16 does 2.5–3× faster than fp32 (a 128-channel 3×3 convolution: 129 → 45 ms, one
thread; `benchmarks/bf16_kernels.py`). Two kernels go the other way on the same CPU, and they decide the step:
- torch's flash attention for CPU: forward + backward in bf16 is 11× slower than in fp32 at the mini teacher's
  shape (64 × 4 heads × 16 tokens × 32: 16.2 against 1.4 ms). diffusers' `AttnProcessor` (explicit
  q·kᵀ, softmax and ·v, the processor torch 1.x used) has no such cliff. With `upcast_softmax` the softmax runs in fp32.
- group norm: bf16 is 1.4× slower than fp32 on CPU. Normalising in fp32 and casting back is faster, with the same
  values (torch's bf16 kernel reduces in fp32 too).
On the mini preset's step (one thread, batch 64; `benchmarks/train_speed.py --preset`, two runs) these take bf16
from 1.86 / 1.56 s to 1.32 / 1.35 s, against fp32's 1.77 / 2.11 s. Neither change touches a GPU run or an fp32 one:
`install` is only called for a network on a CPU under bf16/fp16 mixed precision.
"""

from __future__ import annotations

import logging
import types
from collections import Counter

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor

logger = logging.getLogger(__name__)


def wanted(network, train_cfg) -> bool:
    """Whether `network` trains in low precision on a CPU (the only case `install` is for) and the config allows it."""
    on_cpu = next(network.parameters()).device.type == "cpu"
    return train_cfg.cpu_lowp_kernels and train_cfg.mixed_precision != "no" and on_cpu


def apply(network, train_cfg) -> None:
    """`install` where `wanted`: the one call the entry scripts make, for each network that runs in the step."""
    if wanted(network, train_cfg):
        install(network)


def _fp32_group_norm(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm.forward computed in fp32 and returned in x's dtype (bound as a method, so a deepcopy follows)."""
    w = None if self.weight is None else self.weight.float()
    b = None if self.bias is None else self.bias.float()
    return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def install(network) -> Counter:
    """Give `network`'s attention layers diffusers' `AttnProcessor` with fp32 softmax, and its GroupNorms an fp32
    forward. In place (LoRA's roles share the one UNet) and idempotent; returns the counts changed."""
    counts: Counter = Counter()
    for module in network.modules():
        if isinstance(module, Attention):
            module.upcast_softmax = True
            module.set_processor(AttnProcessor())
            counts["attention"] += 1
        elif isinstance(module, torch.nn.GroupNorm):
            module.forward = types.MethodType(_fp32_group_norm, module)  # an instance attribute over the class's
            counts["group norm"] += 1
    logger.info("low precision on CPU: %d attention layer(s) on AttnProcessor, %d group norm(s) in fp32",
                counts["attention"], counts["group norm"])
    return counts
