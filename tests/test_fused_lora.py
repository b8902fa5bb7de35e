"""The fused LoRA forward (lcm/fused_lora.py) is PEFT's function: same outputs and adapter gradients on a tiny SDXL
UNet, the same delta weight as PEFT's own merge, and PEFT's forward wherever the fusion would not be exact."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft.tuners.lora import layer as lora_layer

from lcm import fused_lora
from lcm.config import LCM_LORA_TARGETS
from lcm.ema import swapped_weights
from lcm.lora import add_lora
from lcm.roles import adapters_disabled
from tests._helpers import randomise_lora_b, sdxl_unet_inputs


def lora_unet(tiny_sdxl_dir, dropout: float = 0.0, rank: int = 4, alpha: float = 8.0):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    params = add_lora(unet, rank, alpha, LCM_LORA_TARGETS, dropout)
    randomise_lora_b(unet, seed=3)
    return unet, params


def out_and_grads(unet, params, inputs):
    for p in params:
        p.grad = None
    out = unet(**inputs).sample
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # a loss that weights every output
    return out.detach(), [p.grad.clone() for p in params]


def lora_layers(unet):
    return [m for m in unet.modules() if isinstance(m, lora_layer.LoraLayer)]


def test_outputs_and_adapter_gradients_equal_peft(tiny_sdxl_dir):
    unet, params = lora_unet(tiny_sdxl_dir)
    inputs = sdxl_unet_inputs(unet)
    ref_out, ref_grads = out_and_grads(unet, params, inputs)
    with fused_lora.fused(unet) as outcomes:
        out, grads = out_and_grads(unet, params, inputs)
    assert outcomes == {"fused": len(lora_layers(unet))}
    kinds = {type(m.get_base_layer()) for m in lora_layers(unet)}
    assert kinds == {torch.nn.Linear, torch.nn.Conv2d}  # both code paths ran
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        # float32 sums in another order: within 1e-4 of each gradient tensor's own scale (a wrong delta is O(1) off)
        torch.testing.assert_close(g, r, rtol=0, atol=1e-4 * r.abs().max().item())
        assert r.abs().max() > 0
    assert (out - unet(**inputs).sample).abs().max() < 1e-5  # uninstalled: PEFT's forward again


def test_fused_forward_runs_instead_of_the_adapter_kernels(tiny_sdxl_dir):
    """The speed claim rests on the adapter modules not running: count their calls."""
    unet, _ = lora_unet(tiny_sdxl_dir)
    calls = []
    for m in lora_layers(unet):
        m.lora_A["default"].register_forward_hook(lambda *a: calls.append(1))
    inputs = sdxl_unet_inputs(unet)
    with torch.no_grad(), fused_lora.fused(unet):
        unet(**inputs)
    assert calls == []
    with torch.no_grad():
        unet(**inputs)
    assert len(calls) == len(lora_layers(unet))


@pytest.mark.parametrize("kind", [torch.nn.Linear, torch.nn.Conv2d])
def test_effective_weight_equals_peft_delta(tiny_sdxl_dir, kind):
    unet, _ = lora_unet(tiny_sdxl_dir)
    layer = next(m for m in lora_layers(unet) if type(m.get_base_layer()) is kind)
    with torch.no_grad():
        w = fused_lora.effective_weight(layer, "default")
        torch.testing.assert_close(w, layer.get_base_layer().weight + layer.get_delta_weight("default"))


def test_disabled_adapters_give_the_base_model(tiny_sdxl_dir):
    """The LCM-LoRA teacher is the same module with adapters disabled: fused layers must step aside."""
    unet, _ = lora_unet(tiny_sdxl_dir)
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    inputs = sdxl_unet_inputs(unet)
    with torch.no_grad(), fused_lora.fused(unet), adapters_disabled(unet):
        torch.testing.assert_close(unet(**inputs).sample, base(**inputs).sample)


def test_swapped_ema_weights_reach_the_fused_forward(tiny_sdxl_dir):
    """The EMA target rebinds the adapters' .data: the fused weight must be built from the swapped values."""
    unet, params = lora_unet(tiny_sdxl_dir)
    shadow = [p.detach() * 0.5 for p in params]
    inputs = sdxl_unet_inputs(unet)
    with torch.no_grad():
        with swapped_weights(params, shadow):
            ref = unet(**inputs).sample
        with fused_lora.fused(unet), swapped_weights(params, shadow):
            out = unet(**inputs).sample
        plain = unet(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (plain - ref).abs().max() > 1e-3  # the swap changed the function, so the comparison can fail


def test_dropout_keeps_peft_forward_and_says_why(tiny_sdxl_dir, caplog):
    unet, _ = lora_unet(tiny_sdxl_dir, dropout=0.1)
    with caplog.at_level("INFO", logger="lcm.fused_lora"), fused_lora.fused(unet) as outcomes:
        assert not any(hasattr(m, fused_lora._ORIGINAL) for m in lora_layers(unet))
    assert outcomes == {"dropout": len(lora_layers(unet))}
    assert "dropout" in caplog.text


def test_mixed_dtypes_keep_peft_forward(tiny_sdxl_dir):
    """fp16/bf16 base weights with fp32 adapters: fusing would round the delta into the base dtype."""
    unet, _ = lora_unet(tiny_sdxl_dir)
    for m in lora_layers(unet):
        m.get_base_layer().to(torch.bfloat16)
    assert fused_lora.install(unet) == {"dtype": len(lora_layers(unet))}


def test_lowp_fuses_low_precision_base_weights_rounding_once(tiny_sdxl_dir):
    """lora.fused_lowp: bf16 base weights are fused too, with W + s·B·A formed in fp32 and rounded once. Under bf16
    autocast its outputs and adapter gradients are no further from fp32's than PEFT's own bf16 forward (measured:
    3.1% / 5.8% against PEFT's 3.7% / 7.4%, relative norms; dropping the delta is 129% off)."""
    unet, params = lora_unet(tiny_sdxl_dir)
    inputs = sdxl_unet_inputs(unet)
    out32, grads32 = out_and_grads(unet, params, inputs)
    for m in lora_layers(unet):
        m.get_base_layer().to(torch.bfloat16)
    layer = next(m for m in lora_layers(unet) if type(m.get_base_layer()) is torch.nn.Conv2d)
    with torch.no_grad():
        w = layer.get_base_layer().weight
        oracle = (w.float() + layer.get_delta_weight("default")).to(torch.bfloat16)
        assert torch.equal(fused_lora.effective_weight(layer, "default"), oracle)

    def errors(out, grads):
        flat, ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads32])
        return (out.float() - out32).norm() / out32.norm(), (flat - ref).norm() / ref.norm()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft = errors(*out_and_grads(unet, params, inputs))
        with fused_lora.fused(unet, lowp=True) as outcomes:
            fused = errors(*out_and_grads(unet, params, inputs))
    assert outcomes == {"fused": len(lora_layers(unet))}
    assert fused[0] < 1.5 * peft[0] and fused[1] < 1.5 * peft[1], (fused, peft)
    assert peft[0] < 0.1  # bf16 rounding, far from a lost delta


def test_install_is_idempotent_and_uninstall_restores(tiny_sdxl_dir):
    unet, _ = lora_unet(tiny_sdxl_dir)
    n = len(lora_layers(unet))
    assert fused_lora.install(unet) == {"fused": n}
    assert fused_lora.install(unet) == {"fused": n}
    fused_lora.uninstall(unet)
    assert all("forward" not in vars(m) for m in lora_layers(unet))


def test_training_with_and_without_the_fused_forward_gives_the_same_lora(tiny_sdxl_dir, tmp_path, monkeypatch):
    """train_lcm_lora.py end to end (EMA target on): lora.fused_forward=true and false train the same adapters."""
    from safetensors.torch import load_file

    from lcm.tiny import make_captioned_image_folder
    from tests._helpers import load_entry_script

    data = make_captioned_image_folder(tmp_path / "data", n=4, size=16)
    train = load_entry_script("train_lcm_lora")
    loras, calls = {}, []
    real = fused_lora.effective_weight
    monkeypatch.setattr(fused_lora, "effective_weight", lambda *a: calls.append(1) or real(*a))
    for fused in ("true", "false"):
        out = tmp_path / f"fused-{fused}"
        assert train.main(["--config", "demo_lcm_lora", f"model.pretrained={tiny_sdxl_dir}", f"data.path={data}",
                           f"train.output_dir={out}", "data.resolution=16", "train.batch_size=2", "lora.rank=4",
                           "lora.alpha=4", "train.max_train_steps=3", "train.report_to=none", "distill.ema_decay=0.9",
                           "validation.every_n_steps=0", "train.checkpoint_every=0",
                           f"lora.fused_forward={fused}"]) == 0
        loras[fused] = load_file(out / "final" / "pytorch_lora_weights.safetensors")
        calls.append(fused)
    assert calls.index("true") > 0 and calls[-2] == "true"  # the fused weights were built, and only when asked
    assert loras["true"].keys() == loras["false"].keys()
    moved = 0
    for k, v in loras["true"].items():
        torch.testing.assert_close(v, loras["false"][k], rtol=0, atol=1e-5 * (1 + v.abs().max().item()))
        moved += ("lora_B" in k or "lora.up" in k) and v.abs().max().item() > 0
    assert moved  # B starts at zero: trained B tensors are compared
