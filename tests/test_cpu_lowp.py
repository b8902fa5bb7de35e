"""lcm/cpu_lowp.py: for bf16 training on a CPU, attention runs on diffusers' AttnProcessor and group norm in fp32.
In fp32 both are the same function as before; in bf16 group norm equals the fp32 oracle rounded once; and the changes
are confined to the networks that asked (a deep copy keeps its own weights, an fp32 run is untouched)."""

import copy

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from lcm import cpu_lowp
from lcm.config import load_config
from lcm.entry import apply_speed_options
from tests._helpers import sdxl_unet_inputs


def group_norms(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]


def randomise_norms(net, seed=5):
    """Group-norm affine parameters off their (1, 0) init, so a norm that drops them is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in group_norms(net):
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


def test_same_function_in_fp32(tiny_sdxl_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    randomise_norms(unet)
    inputs = sdxl_unet_inputs(unet)
    with torch.no_grad():
        ref = unet(**inputs).sample
        counts = cpu_lowp.install(unet)
        out = unet(**inputs).sample
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    assert counts == {"attention": len(attention), "group norm": len(group_norms(unet))}
    assert attention and all(isinstance(m.processor, AttnProcessor) for m in attention)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_group_norm_is_the_fp32_norm_rounded_once():
    norm = torch.nn.GroupNorm(4, 16).to(torch.bfloat16)
    randomise_norms(norm)
    x = (3 + 2 * torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    with torch.no_grad():
        plain = norm(x)
        cpu_lowp.install(norm)
        out = norm(x)
    oracle = F.group_norm(x.float(), 4, norm.weight.float(), norm.bias.float(), norm.eps).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, oracle)
    # torch's bf16 kernel also reduces in fp32: the same values, only slower (lcm/cpu_lowp.py)
    torch.testing.assert_close(plain, oracle)
    assert not torch.equal(out, F.group_norm(x.float(), 4, eps=norm.eps).to(torch.bfloat16))  # the affine counts


def test_install_is_idempotent_and_a_deep_copy_keeps_its_own_weights():
    norm = torch.nn.GroupNorm(2, 4)
    cpu_lowp.install(norm)
    assert cpu_lowp.install(norm) == {"group norm": 1}
    twin = copy.deepcopy(norm)
    with torch.no_grad():
        twin.weight.mul_(3.0)
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(twin(x), F.group_norm(x, 2, twin.weight, twin.bias, twin.eps))
    torch.testing.assert_close(norm(x), F.group_norm(x, 2, norm.weight, norm.bias, norm.eps))


def test_apply_speed_options_installs_only_for_low_precision_on_cpu(tiny_sdxl_dir):
    for precision, processor in (("no", AttnProcessor2_0), ("bf16", AttnProcessor)):
        unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
        cfg = load_config(None, ["model.pretrained=x", "data.path=y", f"train.mixed_precision={precision}"])
        apply_speed_options(unet, cfg.train)
        assert all(isinstance(p, processor) for p in unet.attn_processors.values()), precision
        assert all(("forward" in vars(m)) == (precision == "bf16") for m in group_norms(unet)), precision
