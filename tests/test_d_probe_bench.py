"""benchmarks/d_probe_mini.probe: fresh heads on the frozen teacher's features must separate an obviously different
fake set at low t̂, and stay near chance when real and fake are the same distribution."""

import pytest
import torch

from benchmarks.d_probe_mini import probe
from lcm.schedule import NoiseSchedule, scaled_linear_alphas_cumprod
from lcm.tiny import build_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def setup(n=32):
    unet = build_tiny_sdxl_pipeline(seed=0).unet.requires_grad_(False)
    c = unet.config
    text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    g = torch.Generator().manual_seed(0)
    cond = {"encoder_hidden_states": torch.zeros(n, 77, c.cross_attention_dim),
            "text_embeds": torch.zeros(n, text_dim), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * n)}
    return unet, cond, torch.randn(n, 4, 8, 8, generator=g), NoiseSchedule(scaled_linear_alphas_cumprod())


def test_probe_separates_a_shifted_fake_set_at_low_t_hat(setup):
    unet, cond, real, schedule = setup
    out = probe(unet, cond, real, real * 0.2 + 2.0, t_hat=20, iters=30, schedule=schedule)
    assert out["acc"] > 0.9, out


def test_probe_is_near_chance_when_fake_is_real(setup):
    unet, cond, real, schedule = setup
    g = torch.Generator().manual_seed(5)
    out = probe(unet, cond, real, torch.randn(real.shape, generator=g), t_hat=20, iters=30, schedule=schedule)
    assert 0.2 <= out["acc"] <= 0.8, out


@pytest.mark.parametrize("t_hat", [0, 20])
def test_cnn_probe_separates_a_shifted_fake_set_and_not_real_from_real(setup, t_hat):
    """benchmarks/d_probe_latent_mini.cnn_probe: the from-scratch CNN on latents (clean at t̂ = 0, re-noised above)
    must tell an obviously different set apart, and stay near chance on two draws of one distribution."""
    from benchmarks.d_probe_latent_mini import cnn_probe

    _, _, real, schedule = setup
    assert cnn_probe(real, real * 0.2 + 2.0, t_hat, iters=30, schedule=schedule)["acc"] > 0.9
    g = torch.Generator().manual_seed(5)
    same = cnn_probe(real, torch.randn(real.shape, generator=g), t_hat, iters=30, schedule=schedule)
    assert 0.2 <= same["acc"] <= 0.8, same
