"""The teacher-feature discriminator (lcm/discriminator.py): features equal the UNet's own forward, the frozen backbone
never changes or receives gradients, adapters are off inside it, and gradients reach the judged sample."""

import pytest
import torch

from lcm.discriminator import (build_heads, make_discriminator, teacher_features, text_vector,
                               unet_encoder_features, unet_feature_channels)
from lcm.config import LCM_LORA_TARGETS
from lcm.lora import add_lora
from lcm.tiny import build_tiny_sdxl_pipeline
from tests._helpers import randomise_lora_b, sdxl_unet_inputs


@pytest.fixture(scope="module")
def unet():
    return build_tiny_sdxl_pipeline(seed=0).unet.eval()


def _cond(inputs):
    return {"encoder_hidden_states": inputs["encoder_hidden_states"], **inputs["added_cond_kwargs"]}


def test_features_equal_the_unets_own_forward(unet):
    inputs = sdxl_unet_inputs(unet)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[0])) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o)))
    with torch.no_grad():
        unet(**inputs)
        for h in hooks:
            h.remove()
        ours = unet_encoder_features(unet, inputs["sample"], inputs["timestep"], _cond(inputs))
    assert len(ours) == len(seen) == len(unet_feature_channels(unet))
    for a, b, c in zip(ours, seen, unet_feature_channels(unet)):
        assert a.shape[1] == c
        assert torch.equal(a, b)


def test_heads_shape_and_text_vector(unet):
    inputs = sdxl_unet_inputs(unet)
    heads = build_heads(unet)
    d = make_discriminator(teacher_features(unet), heads)
    logits = d(inputs["sample"], inputs["timestep"], _cond(inputs))
    assert logits.shape == (2, len(unet_feature_channels(unet)))
    assert torch.equal(text_vector(_cond(inputs)), inputs["added_cond_kwargs"]["text_embeds"])
    # PixArt-style conditioning: the masked mean of the token states ignores padded tokens
    states = torch.randn(1, 3, 4)
    masked = text_vector({"encoder_hidden_states": states, "encoder_attention_mask": torch.tensor([[1, 1, 0]])})
    assert torch.allclose(masked, states[:, :2].mean(1))


def test_frozen_backbone_gets_no_gradient_and_adapters_are_off():
    unet = build_tiny_sdxl_pipeline(seed=0).unet
    params = add_lora(unet, 4, 4, LCM_LORA_TARGETS)
    randomise_lora_b(unet, seed=3)  # adapters that change the output, so "off" is visible
    inputs = sdxl_unet_inputs(unet)
    cond = _cond(inputs)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    heads = build_heads(unet)
    d = make_discriminator(teacher_features(unet), heads)
    opt = torch.optim.SGD(heads.parameters(), lr=0.1)
    z = inputs["sample"].clone().requires_grad_(True)
    logits = d(z, inputs["timestep"], cond)
    logits.sum().backward()
    opt.step()
    # the sample receives a gradient (the generator step needs it); no UNet tensor, LoRA included, does
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())
    assert all(torch.equal(before[n], p.detach()) for n, p in unet.named_parameters())
    assert all(p.grad is not None for p in heads.parameters())
    # inside the discriminator the adapters are disabled: the features are the base UNet's
    with torch.no_grad():
        feats = teacher_features(unet)(inputs["sample"], inputs["timestep"], cond)
        on = unet_encoder_features(unet, inputs["sample"], inputs["timestep"], cond)
    base = build_tiny_sdxl_pipeline(seed=0).unet.eval()
    with torch.no_grad():
        ref = unet_encoder_features(base, inputs["sample"], inputs["timestep"], cond)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(feats, ref))
    assert not torch.allclose(on[-1], ref[-1], atol=1e-4)
    assert len(params) > 0


def _copy_trains_alone(net, z, t, cond, features_fn):
    """Shared check of `encoder_copy`: starts equal to the teacher's adapters-off features, every copy tensor gets a
    gradient (nothing unused for DDP), a step moves the copy and leaves the teacher's bytes alone."""
    from lcm.discriminator import EncoderDiscriminator, encoder_copy

    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    copy = encoder_copy(net)
    assert not any("lora_" in n for n, _ in copy.named_parameters())
    with torch.no_grad():
        ref = teacher_features(net)(z, t, cond)
        got = features_fn(copy, z, t, cond)
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))
    d = EncoderDiscriminator(copy, build_heads(net, hidden=8))
    d(z, t, cond).sum().backward()
    unused = [n for n, p in d.named_parameters() if p.grad is None]
    assert unused == []
    torch.optim.SGD(d.parameters(), lr=0.1).step()
    with torch.no_grad():
        moved = features_fn(copy, z, t, cond)
    assert not torch.allclose(moved[-1], ref[-1], atol=1e-4)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[n], p.detach()) for n, p in net.named_parameters())
    return copy


def test_trainable_backbone_is_a_copy_of_the_base_encoder():
    unet = build_tiny_sdxl_pipeline(seed=0).unet.eval()
    add_lora(unet, 4, 4, LCM_LORA_TARGETS)
    randomise_lora_b(unet, seed=3)  # a copy that kept the adapters would differ from the base features
    inputs = sdxl_unet_inputs(unet)
    copy = _copy_trains_alone(unet, inputs["sample"], inputs["timestep"], _cond(inputs), unet_encoder_features)
    assert len(copy.up_blocks) == 0 and copy.conv_out is None  # cut to the encoder
