"""Turn a data batch into model inputs: fp32 VAE latent moments and text conditioning (both SDXL encoders, SD1.5's one,
or PixArt's T5 with its attention mask), encoded now or read from the latent cache (lcm/cache/). No random draws: the
step's draws (z₀ ~ q(z|x), ε, n, w) are `consistency.draw_lcd_batch`'s."""

from __future__ import annotations

import torch

from .consistency import LCDBatch, draw_lcd_batch
from .models import denoiser_name


@torch.no_grad()
def latent_moments(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ) of the VAE posterior q(z|x) in the UNet's latent units, fp32 (the dtype policy keeps the VAE fp32):
    z₀ = μ + σ·ε with μ = (mean − shift)·scaling_factor and σ = std·scaling_factor."""
    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=torch.float32)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (posterior.mean - shift) * vae.config.scaling_factor, posterior.std * vae.config.scaling_factor


@torch.no_grad()
def encode_text(pipe, captions: list[str], time_ids: torch.Tensor | None, device) -> tuple[dict, dict]:
    """(cond, uncond) dicts for the UNet role callables, through the pipeline's own `encode_prompt`.

    SDXL: the unconditional input is zeros for both the token embeddings and the pooled embedding, as SDXL's
    `force_zeros_for_empty_prompt` does at inference; SD1.5 and PixArt encode the empty prompt. PixArt adds the T5
    attention masks and, for the 1024-px model, its (height, width) / aspect-ratio micro-conditioning from
    `time_ids`' target size.
    """
    if denoiser_name(pipe) == "transformer":  # PixArt
        embeds, mask, neg, neg_mask = pipe.encode_prompt(list(captions), do_classifier_free_guidance=True,
                                                         negative_prompt="", device=device)
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        uncond = {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask}
        if pipe.transformer.use_additional_conditions:
            hw = time_ids[:, 4:6].to(device=device, dtype=embeds.dtype)  # target (height, width) in pixels
            extra = {"resolution": hw, "aspect_ratio": (hw[:, :1] / hw[:, 1:])}
            cond, uncond = {**cond, **extra}, {**uncond, **extra}
        return cond, uncond
    if hasattr(pipe, "text_encoder_2"):  # SDXL family
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(captions), device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        time_ids = time_ids.to(device=device, dtype=embeds.dtype)
        cond = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
        uncond = {"encoder_hidden_states": torch.zeros_like(embeds), "text_embeds": torch.zeros_like(pooled),
                  "time_ids": time_ids}
        return cond, uncond
    embeds, neg = pipe.encode_prompt(list(captions), device, 1, True, negative_prompt=[""] * len(captions))
    return {"encoder_hidden_states": embeds}, {"encoder_hidden_states": neg}


def encode_batch(pipe, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """A data batch → (μ, σ, cond, uncond): what `lcm cache` stores and what uncached training computes per step."""
    from .data import add_time_ids

    mu, sigma = latent_moments(pipe.vae, batch["pixel_values"])
    time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
    cond, uncond = encode_text(pipe, batch["caption"], time_ids, device)
    return mu, sigma, cond, uncond


def encoded_inputs(pipe, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """(μ, σ, cond, uncond) on `device`: read from a latent-cache batch (`latent_mean` …: no encoder runs), else
    encoded now (`encode_batch`)."""
    if "latent_mean" in batch:
        mu, sigma = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        cond, uncond = ({k: v.to(device) for k, v in batch[part].items()} for part in ("cond", "uncond"))
        return mu, sigma, cond, uncond
    return encode_batch(pipe, batch, device)


def lcd_batch_from_data(pipe, batch: dict, generators: list[torch.Generator], distill_cfg, grid, device) -> LCDBatch:
    """A data batch → LCDBatch: fp32 latent moments and text conditioning with SDXL (h, w) micro-conditioning from
    `encoded_inputs`, then the step's random draws (VAE noise, ε, grid index n, guidance w) from each sample's own CPU
    generator by `consistency.draw_lcd_batch`; nothing here draws."""
    mu, sigma, cond, uncond = encoded_inputs(pipe, batch, device)
    return draw_lcd_batch(mu, sigma, cond, uncond, generators, grid, distill_cfg.w_min, distill_cfg.w_max, device)
