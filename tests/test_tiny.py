"""Tiny in-process pipelines: real tokenizer, real SDXL / SD1.5 structure, real save → from_pretrained path."""

import string

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPTokenizer

from lcm.tiny import (
    BACKGROUNDS,
    COLOURS,
    build_tiny_sd15_pipeline,
    build_tiny_sdxl_pipeline,
    make_captioned_image_folder,
    make_tokenizer,
    save_tiny_pipeline,
)

# Overlapping prefixes ("re"/"red"/"reed", "or"/"orange") exercise the merge order: a later word's merges must not
# break an earlier word into pieces.
WORDS = ("red", "green", "reed", "orange", "or", "circle", "background")


# ----------------------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_whole_words(tmp_path):
    make_tokenizer(tmp_path, WORDS)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 77
    assert len(tok) < 600 + 10 * len(WORDS)

    caption = "a red circle on an orange background"
    ids = tok(caption).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == caption
    for word in WORDS:
        assert tok.tokenize(word) == [word + "</w>"], word
    assert len(tok.tokenize("giraffe")) > 1  # not in `words`: composed from smaller pieces

    # vocab.json + merges.txt alone (no tokenizer.json) define the same tokenizer
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (bare / name).write_bytes((tmp_path / name).read_bytes())
    assert CLIPTokenizer.from_pretrained(bare)(caption).input_ids == ids

    padded = tok(caption, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[len(ids) - 1 :] == [tok.eos_token_id] * (78 - len(ids))


def test_tokenizer_covers_all_ascii_without_unknowns(tmp_path):
    tok = make_tokenizer(tmp_path)  # no words: bytes only
    assert len(tok) == 2 * 256 + 2
    text = string.printable + "\x00\x01\x7f"
    inner = tok(text).input_ids[1:-1]
    # unk is the end token, so an unknown symbol would show up as an end token inside the sequence
    assert tok.eos_token_id not in inner and tok.bos_token_id not in inner
    # CLIP lowercases and re-spaces at pre-token boundaries; apart from that every byte survives the round trip
    text = "Hello, World! x=1+2; {a_b} ~`'\" caf\u00e9 \t\x01"
    decoded = tok.decode(tok(text).input_ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == "".join(text.lower().split())


# ------------------------------------------------------------------------------------------------------------- models
def _unet_inputs(pipe, batch=2):
    """Fixed random UNet inputs for a pipeline's UNet (SDXL added conditioning when the UNet has it)."""
    g = torch.Generator().manual_seed(123)
    cfg = pipe.unet.config
    x = torch.randn(batch, 4, cfg.sample_size, cfg.sample_size, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim, generator=g))
    if cfg.addition_embed_type == "text_time":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(batch, 1)
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, pooled_dim, generator=g), time_ids=time_ids)
    return x, torch.tensor([999, 499]), kw


@torch.no_grad()
def _unet_out(pipe):
    x, t, kw = _unet_inputs(pipe)
    return pipe.unet(x, t, **kw).sample


def test_sdxl_structure():
    pipe = build_tiny_sdxl_pipeline()
    te1, te2, unet = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.unet.config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert pipe.unet.add_embedding.linear_1.in_features == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert te1.vocab_size == len(pipe.tokenizer) and te2.eos_token_id == pipe.tokenizer_2.eos_token_id
    assert pipe.config.force_zeros_for_empty_prompt
    # The trap: DDPM/DDIM/LCM default to clip_sample=True; the teacher's config must carry False to them.
    assert DDPMScheduler.from_config(pipe.scheduler.config).config.clip_sample is False
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 16, 24)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 12) and pipe.vae.config.scaling_factor == 0.13025


def test_seeds_are_deterministic_and_per_module():
    a, b = build_tiny_sdxl_pipeline(seed=0), build_tiny_sdxl_pipeline(seed=0)
    torch.testing.assert_close(_unet_out(a), _unet_out(b), rtol=0, atol=0)
    assert not torch.allclose(_unet_out(a), _unet_out(build_tiny_sdxl_pipeline(seed=1)))
    # A w-embedding, v-prediction variant changes the UNet but leaves the other modules' weights alone.
    w = build_tiny_sdxl_pipeline(seed=0, time_cond_proj_dim=4, prediction_type="v_prediction")
    assert w.unet.config.time_cond_proj_dim == 4 and w.scheduler.config.prediction_type == "v_prediction"
    for name in ("vae", "text_encoder", "text_encoder_2"):
        for p, q in zip(getattr(a, name).parameters(), getattr(w, name).parameters(), strict=True):
            assert torch.equal(p, q), name
    x, t, kw = _unet_inputs(w)
    with torch.no_grad():
        out = w.unet(x, t, timestep_cond=torch.randn(2, 4), **kw).sample
    assert out.shape == x.shape


# Reloaded weights are bit-identical, but safetensors' memory-mapped tensors can sit at a different alignment, which
# can pick another BLAS kernel: allow float32 rounding, nothing more (a wrong weight changes outputs at O(1)).
same = dict(rtol=1e-5, atol=1e-6)


def test_sdxl_reload_gives_identical_unet(tiny_sdxl_dir, no_network):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE
    assert (tiny_sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    torch.testing.assert_close(_unet_out(loaded), _unet_out(build_tiny_sdxl_pipeline(seed=0)), **same)
    # The text side reloads too: same prompt embeddings from the reloaded tokenizers and encoders.
    fresh = build_tiny_sdxl_pipeline(seed=0)
    for p, q in zip(loaded.encode_prompt("a red circle"), fresh.encode_prompt("a red circle"), strict=True):
        if p is not None:
            torch.testing.assert_close(p, q, **same)


def _check_images(images, height, width):
    assert images.shape == (1, height, width, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_sdxl_generates_requested_size(tiny_sdxl_dir, no_network):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    # Non-square on purpose: catches (height, width) swaps.
    out = pipe("a red circle", num_inference_steps=2, height=16, width=24, output_type="np",
               generator=torch.Generator().manual_seed(0))
    _check_images(out.images, 16, 24)


def test_sd15_reload_and_generate(tiny_sd15_dir, no_network):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    assert pipe.safety_checker is None and pipe.unet.config.addition_embed_type is None
    torch.testing.assert_close(_unet_out(pipe), _unet_out(build_tiny_sd15_pipeline(seed=0)), **same)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a blue square", num_inference_steps=2, height=16, width=24, output_type="np",
               generator=torch.Generator().manual_seed(0))
    _check_images(out.images, 16, 24)


def test_save_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="sdxl"):
        save_tiny_pipeline("sd3", tmp_path)


# ---------------------------------------------------------------------------------------------------------------- data
def test_captioned_image_folder(tmp_path):
    folder = make_captioned_image_folder(tmp_path / "a", n=5, size=24, seed=0)
    images = sorted(folder.glob("*.png"))
    assert len(images) == 5
    for path in images:
        caption = path.with_suffix(".txt").read_text().strip()
        assert caption
        pixels = {tuple(p) for p in np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)}
        assert Image.open(path).size == (24, 24)
        # The caption tells the truth: its shape colour and its background colour are both in the picture.
        colour = next(c for c in COLOURS if f" {c} " in caption)
        background = next(b for b in BACKGROUNDS if f" {b} background" in caption)
        assert COLOURS[colour] in pixels and BACKGROUNDS[background] in pixels, caption
    again = make_captioned_image_folder(tmp_path / "b", n=5, size=24, seed=0)
    other = make_captioned_image_folder(tmp_path / "c", n=5, size=24, seed=1)
    read = lambda d: [p.read_bytes() for p in sorted(d.iterdir())]  # noqa: E731
    assert read(folder) == read(again) and read(folder) != read(other)
