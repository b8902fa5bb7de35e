"""Turn a data batch into model inputs: fp32 VAE latents and text conditioning (both SDXL encoders, or SD1.5's one)."""

from __future__ import annotations

import torch

from .consistency import LCDBatch
from .guidance import sample_w


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor, generator=None) -> torch.Tensor:
    """z₀ = (sample of q(z|x) − shift) · scaling_factor, in fp32 (the VAE is kept fp32 by the dtype policy).

    `generator` may be a list, one per image (diffusers' `randn_tensor` draws each image's noise from its own)."""
    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=torch.float32)).latent_dist
    z = posterior.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def encode_text(pipe, captions: list[str], time_ids: torch.Tensor | None, device) -> tuple[dict, dict]:
    """(cond, uncond) dicts for the UNet role callables, through the pipeline's own `encode_prompt`.

    SDXL: the unconditional input is zeros for both the token embeddings and the pooled embedding, as SDXL's
    `force_zeros_for_empty_prompt` does at inference; SD1.5 encodes the empty prompt.
    """
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


def lcd_batch_from_data(pipe, batch: dict, generators: list[torch.Generator], distill_cfg, grid, device) -> LCDBatch:
    """A data batch → LCDBatch: fp32 latents, text conditioning with SDXL (h, w) micro-conditioning, and every
    random draw of the step (VAE noise, ε, grid index n, guidance w) from each sample's own CPU generator, so a sample
    gets the same draws whatever batch, rank or device it lands in."""
    from diffusers.utils.torch_utils import randn_tensor

    from .data import add_time_ids

    if len(generators) != len(batch["caption"]):
        raise ValueError(f"{len(generators)} generators for a batch of {len(batch['caption'])}: need one per sample")
    z0 = encode_images(pipe.vae, batch["pixel_values"], generators)
    time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
    cond, uncond = encode_text(pipe, batch["caption"], time_ids, device)
    return LCDBatch(z0=z0, noise=randn_tensor(z0.shape, generator=generators, device=z0.device, dtype=z0.dtype),
                    index=torch.cat([grid.sample_index(1, g) for g in generators]).to(device),
                    w=torch.cat([sample_w(1, distill_cfg.w_min, distill_cfg.w_max, g) for g in generators]).to(device),
                    cond=cond, uncond=uncond)
