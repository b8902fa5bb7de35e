import pytest
import torch
from diffusers import UNet2DConditionModel

from lcm.config import LCM_LORA_TARGETS
from lcm.ema import swapped_weights
from lcm.lora import add_lora
from lcm.models import noise_schedule_of
from lcm.roles import adapters_disabled, base_role, denoiser_role


@pytest.fixture
def unet(tiny_sdxl_dir):
    return UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")


def _cond(unet, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return {"encoder_hidden_states": torch.randn(B, 77, c.cross_attention_dim, generator=g),
            "text_embeds": torch.randn(B, text_dim, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * B)}


def _perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))


def test_lora_disabled_equals_base_and_enabled_differs(unet):
    z, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999, 500]), _cond(unet)
    base = denoiser_role(unet)(z, t, cond)
    params = add_lora(unet, 4, 4, LCM_LORA_TARGETS)
    _perturb(params)  # B starts at zero; move it so the adapters matter
    with adapters_disabled(unet):
        torch.testing.assert_close(denoiser_role(unet)(z, t, cond), base)
    torch.testing.assert_close(base_role(unet)(z, t, cond), base)
    assert (denoiser_role(unet)(z, t, cond) - base).abs().max() > 1e-4
    # The context manager restored the adapters.
    assert (denoiser_role(unet)(z, t, cond) - base).abs().max() > 1e-4


def test_fresh_lora_starts_equal_to_base(unet):
    z, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), _cond(unet)
    base = denoiser_role(unet)(z, t, cond)
    add_lora(unet, 4, 4, LCM_LORA_TARGETS)
    torch.testing.assert_close(denoiser_role(unet)(z, t, cond), base)


def test_lora_targets_cover_attention_ff_convs_and_time_proj(unet):
    params = add_lora(unet, 4, 4, LCM_LORA_TARGETS)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert len(names) == len(params)
    for kind in ("attn1.to_q", "attn2.to_k", "ff.net.0.proj", "resnets.0.conv1", "time_emb_proj", "downsamplers.0.conv"):
        assert any(kind in n for n in names), kind
    assert not any("lora" not in n for n in names), "only adapter tensors may train"


def test_lora_params_fp32_on_low_precision_base(unet):
    unet.to(torch.bfloat16)
    params = add_lora(unet, 4, 4, ["to_q", "to_k"])
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)


def test_no_matching_target_is_an_error(unet):
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(unet, 4, 4, ["no_such_module"])


def test_other_peft_errors_are_not_reported_as_target_module_errors(unet):
    """PEFT's ValueError for a bad dropout used to come out as a `lora.target_modules` error."""
    with pytest.raises(ValueError, match=r"lora\.dropout=1\.5.*dropout probability") as err:
        add_lora(unet, 4, 4, ["to_q"], dropout=1.5)
    assert "target_modules" not in str(err.value)


def test_swapped_weights_restores():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2))]
    with swapped_weights(params, [torch.full((3,), 7.0), torch.full((2,), 9.0)]):
        assert params[0].sum() == 21 and params[1].sum() == 18
    assert params[0].sum() == 0 and params[1].sum() == 2


def test_noise_schedule_of_teacher_matches_its_scheduler(tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(tiny_sdxl_dir, subfolder="scheduler")
    torch.testing.assert_close(noise_schedule_of(sched).alphas_cumprod.float(), sched.alphas_cumprod)
