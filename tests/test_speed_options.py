"""Speed options change speed, not results: each gives the default's loss and LoRA gradients within tolerance.

One LCM-LoRA loss evaluation on a tiny SDXL UNet (student, target and CFG teacher: the three roles of one UNet), with
lora_B made non-zero so both adapter matrices get gradients. Options are applied by the same function the entry
scripts use (`entry.apply_speed_options`), and mixed precision goes through accelerate's autocast, as in training.
"""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.models.attention_processor import AttnProcessor2_0

from lcm.config import LCM_LORA_TARGETS, load_config
from lcm.consistency import LCDBatch, LCDSpec, lcd_loss
from lcm.entry import apply_speed_options
from lcm.lora import add_lora
from lcm.models import WEIGHT_DTYPES, noise_schedule_of
from lcm.roles import base_role, denoiser_role
from lcm.schedule import SolverGrid
from lcm.tiny import build_tiny_sdxl_pipeline

from _helpers import sdxl_unet_inputs


def _setup(weight_dtype=torch.float32, **train_overrides):
    """A tiny SDXL UNet with LoRA (frozen base in `weight_dtype`, adapters fp32) and the options applied."""
    pipe = build_tiny_sdxl_pipeline(seed=0)
    unet = pipe.unet.to(weight_dtype)
    params = add_lora(unet, rank=4, alpha=4, target_modules=LCM_LORA_TARGETS)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    cfg = load_config(None, ["model.pretrained=x", "data.path=y", *(f"train.{k}={v}" for k, v in train_overrides.items())])
    apply_speed_options(unet, cfg.train)
    unet.train()
    spec = LCDSpec(noise_schedule_of(pipe.scheduler), SolverGrid(1000, 50))
    return unet, params, spec


def _batch(unet) -> LCDBatch:
    x = sdxl_unet_inputs(unet, seed=3)
    g = torch.Generator().manual_seed(4)
    cond = {"encoder_hidden_states": x["encoder_hidden_states"], **x["added_cond_kwargs"]}
    uncond = {k: torch.zeros_like(v) if k != "time_ids" else v for k, v in cond.items()}
    return LCDBatch(z0=x["sample"], noise=torch.randn(x["sample"].shape, generator=g),
                    index=torch.tensor([49, 12]), w=torch.tensor([3.0, 9.0]), cond=cond, uncond=uncond)


def _loss_and_grads(unet, params, spec, mixed_precision="no"):
    AcceleratorState._reset_state(reset_partial_state=True)  # a process holds one precision; this test switches
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    with accelerator.autocast():
        per_sample, _ = lcd_loss(denoiser_role(unet), denoiser_role(unet), base_role(unet), _batch(unet), spec)
    per_sample.mean().backward()
    return per_sample.detach(), [p.grad.detach().clone() for p in params]


@pytest.fixture(scope="module")
def reference():
    return _loss_and_grads(*_setup())


def _assert_close(result, reference, rtol, grad_rtol=None):
    """Per-sample losses within `rtol`; the whole adapter gradient within `grad_rtol` (default `rtol`) in norm."""
    loss, grads = result
    ref_loss, ref_grads = reference
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    flat, ref_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])
    assert ref_flat.norm() > 0
    error = ((flat - ref_flat).norm() / ref_flat.norm()).item()
    assert error < (grad_rtol or rtol), f"gradient relative error {error:.3g}"


def test_two_teacher_calls_equal_one_batched_call(reference):
    unet, params, spec = _setup()
    spec.teacher_batched = False
    _assert_close(_loss_and_grads(unet, params, spec), reference, rtol=1e-4)


def test_gradient_checkpointing_recomputes_and_matches(reference):
    unet, params, spec = _setup(gradient_checkpointing=True)
    block = unet.down_blocks[1].resnets[0]
    calls, forward = [], block.forward
    block.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # hooks do not see checkpoint recomputes
    result = _loss_and_grads(unet, params, spec)
    # Student, batched teacher and target run it once each; the checkpointed student runs it again in backward.
    assert len(calls) == 4, "gradient checkpointing did not recompute the student's forward"
    _assert_close(result, reference, rtol=1e-5)


def test_channels_last_matches(reference):
    unet, params, spec = _setup(channels_last=True)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_close(_loss_and_grads(unet, params, spec), reference, rtol=1e-4)


# Measured relative errors against fp32 (huber loss, c = 0.001): bf16 loss 1.1e-2, gradient 0.23; fp16 loss 1.9e-3,
# gradient 0.05. The gradient error is large because pseudo-Huber's slope (a − b)/√((a − b)² + c²) turns the rounding
# of a − b ~ c into O(1) changes; with the l2 loss the bf16 gradient error is 0.09. A broken path (adapters or their
# gradients in half precision, autocast off for the student) shows up in the dtype checks or as O(1) errors.
@pytest.mark.parametrize("mixed_precision, loss_rtol, grad_rtol", [("bf16", 3e-2, 0.35), ("fp16", 1e-2, 0.1)])
def test_mixed_precision_keeps_fp32_adapters_and_matches(reference, mixed_precision, loss_rtol, grad_rtol):
    unet, params, spec = _setup(WEIGHT_DTYPES[mixed_precision])
    assert unet.conv_in.weight.dtype == WEIGHT_DTYPES[mixed_precision]
    loss, grads = _loss_and_grads(unet, params, spec, mixed_precision)
    assert all(p.dtype == torch.float32 for p in params) and all(g.dtype == torch.float32 for g in grads)
    _assert_close((loss, grads), reference, loss_rtol, grad_rtol)


def test_attention_is_sdpa_by_default():
    """diffusers' default attention processor calls torch's scaled_dot_product_attention; LoRA keeps it."""
    unet, _, _ = _setup()
    processors = unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


@pytest.mark.slow
def test_compile_capture_matches(reference):
    """torch.compile's graph capture (dynamo + AOT autograd, no code generation) through the three roles: ~110 s on
    2 busy CPU cores (dynamo traces the UNet once per role: adapters on with grad, off, on without grad), so slow."""
    unet, params, spec = _setup(torch_compile=True, compile_backend="aot_eager")
    _assert_close(_loss_and_grads(unet, params, spec), reference, rtol=1e-4)


@pytest.mark.slow
def test_compile_inductor_matches(reference):
    """The default backend, with generated C++ kernels (slow: minutes on 2 CPU cores)."""
    unet, params, spec = _setup(torch_compile=True)
    _assert_close(_loss_and_grads(unet, params, spec), reference, rtol=1e-4)


# On a CPU, bf16 training also puts attention on diffusers' AttnProcessor and group norm in fp32 (lcm/cpu_lowp.py),
# and `lora.fused_lowp` rounds each fused W + s·B·A to bf16 once. Relative errors against fp32 measured here (loss,
# gradient): bf16 with torch's kernels 1.1e-2 / 0.23, with cpu_lowp's 9.6e-3 / 0.27, and fused 5.6e-3 / 0.19: the
# same order, so the same bounds as the plain bf16 test above.
@pytest.mark.parametrize("fused_lowp", [False, True])
def test_bf16_on_cpu_with_its_kernels_matches(reference, fused_lowp):
    from lcm import fused_lora

    unet, params, spec = _setup(WEIGHT_DTYPES["bf16"], mixed_precision="bf16")
    assert not any(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())  # cpu_lowp installed
    if fused_lowp:
        outcomes = fused_lora.install(unet, lowp=True)
        assert set(outcomes) == {"fused"}
    loss, grads = _loss_and_grads(unet, params, spec, "bf16")
    assert all(g.dtype == torch.float32 for g in grads)
    _assert_close((loss, grads), reference, 3e-2, 0.35)
