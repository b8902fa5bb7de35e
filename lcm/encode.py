"""Turn a data batch into model inputs: fp32 VAE latents and text conditioning (both SDXL encoders, SD1.5's one, or
PixArt's T5 with its attention mask)."""

from __future__ import annotations

import torch

from .consistency import LCDBatch
from .guidance import sample_w


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z₀ = (sample of q(z|x) − shift) · scaling_factor, in fp32 (the VAE is kept fp32 by the dtype policy)."""
    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=torch.float32)).latent_dist
    z = posterior.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def encode_text(pipe, captions: list[str], time_ids: torch.Tensor | None, device) -> tuple[dict, dict]:
    """(cond, uncond) dicts for the UNet role callables, through the pipeline's own `encode_prompt`.

    SDXL: the unconditional input is zeros for both the token embeddings and the pooled embedding, as SDXL's
    `force_zeros_for_empty_prompt` does at inference; SD1.5 and PixArt encode the empty prompt. PixArt adds the T5
    attention masks and, for the 1024-px model, its (height, width) / aspect-ratio micro-conditioning from
    `time_ids`' target size.
    """
    if getattr(pipe, "transformer", None) is not None:  # PixArt
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


def lcd_batch_from_data(pipe, batch: dict, generator: torch.Generator, distill_cfg, grid, device) -> LCDBatch:
    """A data batch → LCDBatch: fp32 latents, text conditioning with SDXL (h, w) micro-conditioning, and every
    random draw of the step (noise ε, grid index n, guidance w) from this step's generator."""
    from .data import add_time_ids

    z0 = encode_images(pipe.vae, batch["pixel_values"], generator)
    time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
    cond, uncond = encode_text(pipe, batch["caption"], time_ids, device)
    B = z0.shape[0]
    return LCDBatch(z0=z0, noise=torch.randn(z0.shape, generator=generator, device=device),
                    index=grid.sample_index(B, generator, device),
                    w=sample_w(B, distill_cfg.w_min, distill_cfg.w_max, generator, device), cond=cond, uncond=uncond)
