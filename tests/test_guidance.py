import torch
from diffusers import StableDiffusionXLPipeline

from lcm.guidance import cfg, guidance_scale_from_w, sample_w, w_embedding, w_from_guidance_scale


def test_cfg_w_zero_is_conditional():
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(cfg(c, u, torch.zeros(3)), c)


def test_cfg_equals_diffusers_formula_with_g_equals_w_plus_one():
    c, u, w = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0.5, 3.0, 7.0])
    g = guidance_scale_from_w(w)[:, None]
    torch.testing.assert_close(cfg(c, u, w), u + g * (c - u))


def test_w_conversion_round_trip():
    assert w_from_guidance_scale(guidance_scale_from_w(3.5)) == 3.5
    assert guidance_scale_from_w(0.0) == 1.0


def test_sample_w_range_and_determinism():
    w1 = sample_w(1000, 3.0, 15.0, torch.Generator().manual_seed(0))
    w2 = sample_w(1000, 3.0, 15.0, torch.Generator().manual_seed(0))
    assert torch.equal(w1, w2) and w1.min() >= 3.0 and w1.max() <= 15.0 and w1.std() > 2.0


def test_w_embedding_equals_pipeline_embedding_of_guidance_scale_minus_one():
    w = torch.tensor([0.0, 1.5, 7.0])
    # The pipeline embeds guidance_scale − 1; with g = w + 1 that is exactly our w.
    g = guidance_scale_from_w(w)
    theirs = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, g - 1, embedding_dim=256)
    torch.testing.assert_close(w_embedding(w, 256), theirs)
