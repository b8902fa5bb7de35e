"""The FLOP ceiling for the latent cache (benchmarks/flops_cache.py): the counter agrees with an analytic count, the
shipped text-encoder configs are SDXL's published ones, and a step from images costs exactly the step from the cache
plus the encoders, which is what the ceiling 1 / (1 − f) assumes."""

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from benchmarks import flops_cache
from lcm.tiny import build_tiny_sdxl_pipeline


def test_counter_matches_analytic_linear_and_conv_flops():
    linear, conv = torch.nn.Linear(24, 40), torch.nn.Conv2d(3, 8, 3, padding=1)
    assert flops_cache.count_flops(lambda: linear(torch.zeros(5, 24))) == 2 * 5 * 24 * 40
    assert flops_cache.count_flops(lambda: conv(torch.zeros(2, 3, 6, 6))) == 2 * 2 * 8 * 6 * 6 * 3 * 9


def test_shipped_text_encoder_configs_are_sdxl_sizes():
    def n_params(cls, name):
        with torch.device("meta"):
            return sum(p.numel() for p in cls(CLIPTextConfig(**flops_cache.published_config(name))).parameters())

    assert n_params(CLIPTextModel, "sdxl_text_encoder.json") == 123_060_480  # CLIP ViT-L/14 text tower
    assert n_params(CLIPTextModelWithProjection, "sdxl_text_encoder_2.json") == 694_659_840  # OpenCLIP bigG/14


def test_step_from_images_is_step_from_cache_plus_encoders():
    torch.manual_seed(0)
    counts = flops_cache.step_flops(build_tiny_sdxl_pipeline(), batch=2, resolution=16, rank=4, checkpointing=False,
                                    device="cpu")
    assert counts["encoders"] > 0 and counts["step_cache"] > 0
    assert counts["step_images"] == counts["step_cache"] + counts["encoders"]
    assert counts["latent_shape"] == [2, 4, 8, 8]


def test_full_size_pipeline_is_built_on_meta_from_the_shipped_configs():
    pipe = flops_cache.full_size_sdxl("meta")
    assert pipe.unet.device.type == "meta" and pipe.text_encoder_2.device.type == "meta"
    assert sum(p.numel() for p in pipe.unet.parameters()) == 2_567_463_684
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77
