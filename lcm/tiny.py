"""Tiny, architecturally real diffusers pipelines built in-process (no hub, no download).

Used by the tests, by the README's built-in default job and by benchmarks. Every model is a real diffusers /
transformers class built from a small config, so the real code paths run: SDXL's two text encoders (penultimate hidden
states of both, pooled + projected output of the second), the `text_time` added conditioning, `save_pretrained` /
`from_pretrained`. Weights are random but seeded: one seed per module, so a given `seed` always gives the same weights.

PixArt-α at toy size has a real T5 encoder and a real `T5Tokenizer` built from a small in-memory unigram vocab.

Default sizes (see `tests/test_tiny.py` for the checks): a 16 px image has 4x8x8 latents (VAE downscale 2).
"""

from __future__ import annotations

import json
import string
import tempfile
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"  # CLIP's BPE marks the last symbol of every word with this suffix
MODEL_MAX_LENGTH = 77

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# Whole-word tokens of the tiny tokenizer: the image-folder captions ("a red circle on a white background") and the
# mini teacher's digit captions ("a handwritten digit seven"). Any other ASCII text still tokenises, byte by byte.
CAPTION_WORDS = (
    *COLOURS, *BACKGROUNDS, *SHAPES, "a", "on", "background", "handwritten", "digit",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

# Per-module seed offsets: each module gets its own stream, so changing one module's config (e.g. adding
# `time_cond_proj_dim` to the UNet) leaves the other modules' weights unchanged.
_SEED_OFFSET = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3, "transformer": 4}


# ----------------------------------------------------------------------------------------------------------- tokenizer
def byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: byte b ↦ a printable unicode char, in byte order (256 chars).

    Printable Latin-1 bytes map to themselves; the others (controls, space, …) are shifted to U+0100 onwards.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the adjacent pair with the lowest rank (what `tokenizers`' BPE model does)."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks) + 1), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _word_merges(words: Iterable[str], alphabet: list[str]) -> list[tuple[str, str]]:
    """Merges that turn each word into one token `word</w>`, built character by character.

    Words are added one at a time. For a new word we run BPE with the merges so far and append a merge of its first two
    pieces until it is a single token. Appended merges have the lowest priority, so they never fire inside an earlier
    word before that word is already whole: earlier words keep their tokenisation (checked in the tests).
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        word = unicodedata.normalize("NFC", word).lower()  # the tokenizer's normaliser does the same
        if not word.isalpha():
            raise ValueError(f"tokenizer words must be single alphabetic words (one CLIP pre-token), got {word!r}")
        symbols = [alphabet[b] for b in word.encode("utf-8")]
        symbols[-1] += EOW
        while len(pieces := _bpe(symbols, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
    return merges


def make_tokenizer(save_dir: str | Path, words: Iterable[str] = ()) -> CLIPTokenizer:
    """A real `CLIPTokenizer` from a small local vocab (vocab.json + merges.txt in `save_dir`), reloaded from disk.

    Vocab layout follows CLIP's: the 256 byte chars, their 256 `</w>` variants, merged tokens, then `<|startoftext|>`
    and `<|endoftext|>` last (so the end token has the highest id, as in CLIP). 514 tokens + the merges for `words`.
    Padding uses `<|endoftext|>` (as SD1.5's tokenizer and CLIP's own do). Real SDXL `tokenizer_2` pads with "!"; here
    both tokenizers pad with the end token, which is harmless: `CLIPTextModelWithProjection` pools at the *first*
    end token (its config carries `eos_token_id`), and the UNet attends to all 77 positions either way.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    merges = _word_merges(dict.fromkeys(words), alphabet)  # dict.fromkeys: drop duplicates, keep order
    tokens = [*alphabet, *(c + EOW for c in alphabet), *dict.fromkeys(a + b for a, b in merges), BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (save_dir / "merges.txt").write_text(merges_txt, encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges,
        unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.save_pretrained(save_dir)  # adds tokenizer.json / tokenizer_config.json (model_max_length, specials)
    return CLIPTokenizer.from_pretrained(save_dir)


def make_t5_tokenizer(words: Iterable[str] = CAPTION_WORDS) -> T5Tokenizer:
    """A real (unigram, SentencePiece-style) `T5Tokenizer` over a small vocab, built in memory.

    Layout as T5's: `<pad>` 0, `</s>` 1, `<unk>` 2; then `▁word` for each whole word (a word-start piece, preferred by
    the unigram scores) and single characters, so any ASCII text still tokenises. No `<extra_id_*>` sentinels.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


# ------------------------------------------------------------------------------------------------------------- models
def _seeded(seed: int, module: str) -> None:
    torch.manual_seed(seed + _SEED_OFFSET[module])


def _text_config(tokenizer: CLIPTokenizer, hidden: int, hidden_act: str, projection_dim: int) -> CLIPTextConfig:
    # Ids from the tokenizer: with the right `eos_token_id` the pooled output is taken at the first end token.
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=projection_dim,
        hidden_act=hidden_act, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(seed: int, scaling_factor: float, image_size: int) -> AutoencoderKL:
    # Two blocks → one downsample → vae_scale_factor 2 (the pipelines read it from len(block_out_channels)).
    _seeded(seed, "vae")
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=image_size, scaling_factor=scaling_factor,
    )


def _scheduler_config(prediction_type: str) -> dict:
    # SDXL/SD1.5 training schedule. clip_sample=False is carried in the config (hidden for Euler/PNDM) so that
    # DDPM/DDIM/LCM schedulers made `from_config` from it do not clip x̂₀ to [-1, 1] (their default is True).
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="leading", sample_max_value=1.0, skip_prk_steps=True, trained_betas=None,
    )


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def _sdxl_unet_config(sample_size, block_out_channels, cross_attention_dim, layers_per_block,
                      transformer_layers_per_block, addition_time_embed_dim, text_projection_dim,
                      time_cond_proj_dim) -> dict:
    """The UNet config of a tiny SDXL: SDXL's block layout and `text_time` added conditioning at toy widths."""
    n = len(block_out_channels)
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, norm_num_groups=8,
        # SDXL: no attention in the first (highest-resolution) block.
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        transformer_layers_per_block=tuple(transformer_layers_per_block),
        attention_head_dim=tuple(c // 16 for c in block_out_channels),  # diffusers' name for the head *count*
        use_linear_projection=True, cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
        # 6 size/crop numbers (original size, crop top-left, target size), each Fourier-embedded, + pooled text.
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_projection_dim,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def build_tiny_sdxl_pipeline(
    seed: int = 0,
    sample_size: int = 8,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 64,
    layers_per_block: int = 2,
    transformer_layers_per_block: tuple[int, ...] = (1, 2),
    addition_time_embed_dim: int = 8,
    text_projection_dim: int = 32,
    prediction_type: str = "epsilon",
    time_cond_proj_dim: int | None = None,
    vae_scaling_factor: float = 0.13025,
    words: Iterable[str] = CAPTION_WORDS,
    unet_kwargs: dict | None = None,
) -> StableDiffusionXLPipeline:
    """SDXL structure at toy size: two CLIP text encoders, `text_time` added conditioning, Euler scheduler.

    `sample_size` is the latent size; images are 2x that. The two text encoders have hidden size
    `cross_attention_dim // 2` each and their penultimate states are concatenated (SDXL: 768 + 1280 = 2048).
    `time_cond_proj_dim` gives the UNet a w-embedding input (`timestep_cond`), as a full-LCD student needs.
    `unet_kwargs` overrides any UNet config key.
    """
    _check_prediction_type(prediction_type)
    if cross_attention_dim % 2:
        raise ValueError(f"cross_attention_dim is split between two text encoders; got odd {cross_attention_dim}")
    hidden = cross_attention_dim // 2
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp) / "tokenizer", words)
        tokenizer_2 = make_tokenizer(Path(tmp) / "tokenizer_2", words)

    unet_config = _sdxl_unet_config(sample_size, block_out_channels, cross_attention_dim, layers_per_block,
                                    transformer_layers_per_block, addition_time_embed_dim, text_projection_dim,
                                    time_cond_proj_dim)
    unet_config.update(unet_kwargs or {})
    _seeded(seed, "unet")
    unet = UNet2DConditionModel(**unet_config)
    vae = _tiny_vae(seed, vae_scaling_factor, image_size=2 * sample_size)
    _seeded(seed, "text_encoder")
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden, "quick_gelu", projection_dim=hidden))
    _seeded(seed, "text_encoder_2")
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden, "gelu", text_projection_dim))
    scheduler = EulerDiscreteScheduler.from_config(
        {**_scheduler_config(prediction_type), "interpolation_type": "linear", "use_karras_sigmas": False}
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,  # the watermarker needs an optional package and would alter test images
    )


def build_tiny_sd15_pipeline(
    seed: int = 0,
    sample_size: int = 8,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    layers_per_block: int = 2,
    prediction_type: str = "epsilon",
    time_cond_proj_dim: int | None = None,
    vae_scaling_factor: float = 0.18215,
    words: Iterable[str] = CAPTION_WORDS,
    unet_kwargs: dict | None = None,
) -> StableDiffusionPipeline:
    """SD1.5 structure at toy size: one CLIP text encoder (last hidden state), no added conditioning, PNDM scheduler."""
    _check_prediction_type(prediction_type)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp) / "tokenizer", words)
    n = len(block_out_channels)
    unet_config = dict(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, norm_num_groups=8,
        # SD1.5: attention everywhere except the lowest-resolution block.
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        attention_head_dim=tuple(c // 16 for c in block_out_channels),
        cross_attention_dim=cross_attention_dim, time_cond_proj_dim=time_cond_proj_dim,
    )
    unet_config.update(unet_kwargs or {})
    _seeded(seed, "unet")
    unet = UNet2DConditionModel(**unet_config)
    vae = _tiny_vae(seed, vae_scaling_factor, image_size=2 * sample_size)
    _seeded(seed, "text_encoder")
    text_encoder = CLIPTextModel(_text_config(tokenizer, cross_attention_dim, "quick_gelu", cross_attention_dim))
    scheduler = PNDMScheduler.from_config(_scheduler_config(prediction_type))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_pixart_pipeline(
    seed: int = 0,
    sample_size: int = 8,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    t5_dim: int = 32,
    prediction_type: str = "epsilon",
    vae_scaling_factor: float = 0.18215,
    words: Iterable[str] = CAPTION_WORDS,
    transformer_kwargs: dict | None = None,
) -> PixArtAlphaPipeline:
    """PixArt-α structure at toy size: a T5 encoder (with its attention mask), a DiT with adaLN-single, learned sigma
    (8 output channels: ε then the variance channels) and patch size 2; DPM-Solver++ on PixArt's linear betas
    0.0001–0.02. No size micro-conditioning (as PixArt-α below 1024 px: it is on only for `sample_size` 128)."""
    _check_prediction_type(prediction_type)
    tokenizer = make_t5_tokenizer(words)
    _seeded(seed, "text_encoder")
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=t5_dim, d_kv=t5_dim // 4, d_ff=2 * t5_dim, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))
    config = dict(
        sample_size=sample_size, num_layers=num_layers, num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim, in_channels=4, out_channels=8, patch_size=2,
        cross_attention_dim=num_attention_heads * attention_head_dim, caption_channels=t5_dim, norm_num_groups=8,
    )
    config.update(transformer_kwargs or {})
    _seeded(seed, "transformer")
    transformer = PixArtTransformer2DModel(**config)
    vae = _tiny_vae(seed, vae_scaling_factor, image_size=2 * sample_size)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type=prediction_type, algorithm_type="dpmsolver++", solver_order=2)
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)


TINY_PIPELINES: dict[str, Callable] = {"sdxl": build_tiny_sdxl_pipeline, "sd15": build_tiny_sd15_pipeline,
                                       "pixart": build_tiny_pixart_pipeline}


def save_tiny_pipeline(kind: str, out_dir: str | Path, **kw) -> Path:
    """Build a tiny pipeline (`kind` in TINY_PIPELINES) and `save_pretrained` it as safetensors; returns `out_dir`."""
    if kind not in TINY_PIPELINES:
        raise ValueError(f"unknown tiny pipeline {kind!r}; valid: {sorted(TINY_PIPELINES)}")
    out_dir = Path(out_dir)
    TINY_PIPELINES[kind](**kw).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------- data
def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")


def make_captioned_image_folder(out_dir: str | Path, n: int = 16, size: int = 32, seed: int = 0) -> Path:
    """Write `n` images of one coloured shape on a plain background, captions in same-stem .txt files.

    Captions read "a red circle on a white background". Shape and colour cycle so every (shape, colour) pair appears
    as early as possible; background, position and size are drawn from `seed`. Deterministic; returns `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    for i in range(n):
        shape, colour = SHAPES[i % len(SHAPES)], colours[(i // len(SHAPES) + i) % len(colours)]
        background = backgrounds[rng.integers(len(backgrounds))]
        extent = size * rng.uniform(0.4, 0.7)
        x0, y0 = rng.uniform(0, size - extent, size=2)
        image = Image.new("RGB", (size, size), BACKGROUNDS[background])
        _draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + extent, y0 + extent), COLOURS[colour])
        image.save(out_dir / f"{i:04d}.png")
        (out_dir / f"{i:04d}.txt").write_text(f"a {colour} {shape} on a {background} background\n", encoding="utf-8")
    return out_dir
