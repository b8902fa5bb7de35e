"""A latent discriminator built from the teacher (LADD, Sauer et al. 2024, arXiv:2403.12015 §3.1): the teacher
denoiser's own encoder (UNet down blocks + mid block) reads a re-noised sample z_t̂, and small trainable heads, one per
feature level, turn each level's features into a logit conditioned on t̂ and the text.

    D(z_t̂, t̂, cond) = [head_l(φ_l(z_t̂, t̂, cond), e(t̂, cond)) for each level l]      → logits (B, L)

- PixArt (a DiT, no encoder/decoder split): φ is the token states after a quarter and a half of its blocks, as maps.
- The backbone φ is frozen by default (`adversarial.backbone=frozen`): the teacher's weights, with LoRA adapters
  disabled, and no gradient into them. Gradients still flow *through* it to z_t̂ in the generator step, which is how
  the student learns from D. It is held by reference, never registered as a submodule, so the trainable module that
  accelerate prepares, checkpoints and wraps in DDP is the heads alone.
- `adversarial.backbone=trainable` (SDXL-Lightning's discriminator, arXiv:2402.13929 §3.3): D owns a copy of the
  teacher's encoder, initialised from its base weights (adapters stripped) and cut to the parts φ reads, trained with
  the heads as one module (`EncoderDiscriminator`). The teacher itself is never touched.
- Each head is a projection discriminator (Miyato & Koyama 2018, arXiv:1802.05637): an unconditional logit plus the
  inner product of the pooled head features with an embedding e of (t̂, text). SDXL's text vector is the pooled
  CLIP-G embedding (`text_embeds`); SD1.5's and PixArt's is the mean token state (PixArt: over the unmasked tokens).

Pixel-space DINOv2 discriminators (ADD's original) need weights this machine cannot download; a feature backbone is
any callable `(z, t, cond) -> list of (B, C_l, H_l, W_l)` with `channels` matching, so one plugs in here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .adversarial import time_features
from .models import config_of, is_transformer
from .roles import adapters_disabled

TIME_FREQS = 16  # sin/cos features of t̂/T in the heads' conditioning


def unet_encoder_features(unet, z, t, cond) -> list[torch.Tensor]:
    """The outputs of every down block and of the mid block of a diffusers `UNet2DConditionModel`, computed with the
    UNet's own embedding helpers in the order its `forward` runs them (steps 1–4 of that method; no ControlNet,
    adapters or attention masks). tests/test_discriminator.py checks them against hooks on a full forward."""
    dtype = next(unet.parameters()).dtype
    sample = z.to(dtype)
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if "text_embeds" in cond else None
    hidden = cond["encoder_hidden_states"].to(dtype)
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=added or {})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.process_encoder_hidden_states(encoder_hidden_states=hidden, added_cond_kwargs=added or {})
    sample = unet.conv_in(sample)
    features = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=hidden)
        else:
            sample, _ = block(hidden_states=sample, temb=emb)
        features.append(sample)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=hidden)
        else:
            sample = unet.mid_block(sample, emb)
        features.append(sample)
    return features


def transformer_feature_blocks(transformer) -> list[int]:
    """How many PixArt blocks each feature level has run: a quarter and a half of the stack (at least one), the DiT
    analogue of a UNet encoder (LADD reads its transformer teachers' first layers the same way)."""
    n = config_of(transformer).num_layers
    return sorted({max(1, n // 4), max(1, n // 2)})


def transformer_encoder_features(transformer, z, t, cond) -> list[torch.Tensor]:
    """PixArt: the token states after `transformer_feature_blocks` blocks, as (B, C, H/p, W/p) maps, computed with
    the model's own embedders in the order its `forward` runs them (patch + position embedding, adaLN-single
    timestep embedding, caption projection; the T5 mask as an additive bias)."""
    config = config_of(transformer)
    dtype = next(transformer.parameters()).dtype
    batch, h, w = z.shape[0], z.shape[-2] // config.patch_size, z.shape[-1] // config.patch_size
    mask = cond.get("encoder_attention_mask")
    bias = None if mask is None else ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)
    added = {k: (cond[k].to(dtype) if k in cond else None) for k in ("resolution", "aspect_ratio")}
    hidden = transformer.pos_embed(z.to(dtype))
    t_emb, _ = transformer.adaln_single(t, added, batch_size=batch, hidden_dtype=dtype)
    text = transformer.caption_projection(cond["encoder_hidden_states"].to(dtype)).view(batch, -1, hidden.shape[-1])
    wanted, features = transformer_feature_blocks(transformer), []
    for i, block in enumerate(transformer.transformer_blocks[: wanted[-1]]):
        hidden = block(hidden, encoder_hidden_states=text, encoder_attention_mask=bias, timestep=t_emb)
        if i + 1 in wanted:
            features.append(hidden.transpose(1, 2).reshape(batch, -1, h, w))
    return features


def unet_feature_channels(unet) -> list[int]:
    """Channels of `unet_encoder_features`' levels: each down block's output width, then the mid block's."""
    widths = list(config_of(unet).block_out_channels)
    return widths + ([widths[-1]] if unet.mid_block is not None else [])


def text_vector(cond: dict) -> torch.Tensor:
    """The text conditioning as one vector per sample: SDXL's pooled embedding, else the (masked) mean token state."""
    if "text_embeds" in cond:
        return cond["text_embeds"].float()
    states = cond["encoder_hidden_states"].float()
    mask = cond.get("encoder_attention_mask")
    if mask is None:
        return states.mean(1)
    mask = mask.float().unsqueeze(-1)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class ProjectionHead(torch.nn.Module):
    """One feature level → one logit: conv body, an unconditional 1×1 logit map (spatial mean), plus the projection
    ⟨pool(h), e⟩/√hidden with e a linear embedding of the conditioning vector."""

    def __init__(self, channels: int, cond_dim: int, hidden: int = 64):
        super().__init__()
        self.hidden = hidden
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, hidden, 3, padding=1), torch.nn.GroupNorm(_groups(hidden), hidden),
            torch.nn.SiLU(), torch.nn.Conv2d(hidden, hidden, 1), torch.nn.SiLU())
        self.logit = torch.nn.Conv2d(hidden, 1, 1)
        self.embed = torch.nn.Linear(cond_dim, hidden)

    def forward(self, feature, c):
        h = self.body(feature.float())
        unconditional = self.logit(h).mean((2, 3)).squeeze(1)
        projection = (h.mean((2, 3)) * self.embed(c)).sum(1) / math.sqrt(self.hidden)
        return unconditional + projection


class FeatureHeads(torch.nn.Module):
    """The trainable part of the discriminator: one `ProjectionHead` per feature level, sharing the conditioning
    vector [time features of t̂; layer-normalised text vector]."""

    def __init__(self, channels: list[int], text_dim: int, hidden: int = 64, T: int = 1000):
        super().__init__()
        self.T, self.text_dim = T, text_dim
        cond_dim = 2 * TIME_FREQS + text_dim
        self.heads = torch.nn.ModuleList([ProjectionHead(c, cond_dim, hidden) for c in channels])

    def conditioning(self, t, cond) -> torch.Tensor:
        text = text_vector(cond)
        if text.shape[-1] != self.text_dim:
            raise ValueError(f"text vector has {text.shape[-1]} features, the heads were built for {self.text_dim}")
        return torch.cat([time_features(t, self.T, TIME_FREQS).to(text.device), F.layer_norm(text, text.shape[-1:])],
                         dim=1)

    def forward(self, features: list[torch.Tensor], t, cond) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature levels for {len(self.heads)} heads")
        c = self.conditioning(t, cond)
        return torch.stack([head(f, c) for head, f in zip(self.heads, features)], dim=1)


def teacher_features(backbone):
    """The frozen-backbone feature callable `(z, t, cond) -> levels`: the teacher's encoder (UNet down + mid blocks,
    or PixArt's first half of blocks) with LoRA adapters off (a no-op on a network without adapters, e.g. full LCD's
    separate teacher)."""
    encoder = transformer_encoder_features if is_transformer(backbone) else unet_encoder_features

    def features(z, t, cond):
        with adapters_disabled(backbone):
            return encoder(backbone, z, t, cond)

    return features


def unet_text_dim(unet) -> int:
    """Width of `text_vector` for this UNet: SDXL's pooled embedding (the add-embedding input less its 6 time ids),
    else the cross-attention width."""
    config = config_of(unet)
    if config.addition_embed_type == "text_time":
        return config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    cross = config.cross_attention_dim
    return cross if isinstance(cross, int) else cross[0]


def build_heads(backbone, hidden: int = 64, T: int = 1000) -> FeatureHeads:
    """Heads sized for `backbone`'s feature levels and text vector; t̂ is read on a T-step schedule."""
    if is_transformer(backbone):
        config = config_of(backbone)
        width = config.num_attention_heads * config.attention_head_dim
        return FeatureHeads([width] * len(transformer_feature_blocks(backbone)), config.caption_channels, hidden, T)
    return FeatureHeads(unet_feature_channels(backbone), unet_text_dim(backbone), hidden, T)


def encoder_copy(backbone) -> torch.nn.Module:
    """A trainable fp32 copy of `backbone`'s encoder: the same class built from its config, loaded with its *base*
    weights (a LoRA layer's `base_layer` tensors; its adapter tensors are dropped), then cut to what the feature
    functions read, so every parameter gets a gradient (DDP's unused-parameter check). UNet: no up blocks or output
    convolution; PixArt: the first half of the blocks, no output layers."""
    copy = type(backbone).from_config(config_of(backbone))
    state = {k.replace(".base_layer.", "."): v for k, v in backbone.state_dict().items() if "lora_" not in k}
    copy.load_state_dict(state, strict=True)
    if is_transformer(copy):
        copy.transformer_blocks = copy.transformer_blocks[: transformer_feature_blocks(copy)[-1]]
        copy.norm_out = copy.proj_out = None
        del copy.scale_shift_table
    else:
        copy.up_blocks = torch.nn.ModuleList()
        copy.conv_norm_out = copy.conv_act = copy.conv_out = None
    return copy.float().train().requires_grad_(True).to(next(backbone.parameters()).device)


class EncoderDiscriminator(torch.nn.Module):
    """D with a trainable backbone: `(z_t̂, t̂, cond) -> logits (B, L)` from its own encoder copy and heads, one
    module, so its optimiser, checkpoint and DDP wrapper cover both."""

    def __init__(self, encoder: torch.nn.Module, heads: FeatureHeads):
        super().__init__()
        self.encoder, self.heads = encoder, heads
        self._features = transformer_encoder_features if is_transformer(encoder) else unet_encoder_features

    def forward(self, z, t, cond):
        return self.heads(self._features(self.encoder, z, t, cond), t, cond)


def make_discriminator(features, heads):
    """D as the losses see it: `(z_t̂, t̂, cond) -> logits (B, L)` from a feature callable and the heads."""

    def discriminator(z, t, cond):
        return heads(features(z, t, cond), t, cond)

    return discriminator


def _pair_features(features, x_end, t_end, x_start, t_start, cond, conditional: bool):
    """Per level: the features of x_{t'} at t' (0 for the clean end), and, for the conditional objective, those of
    x_t at t concatenated along the channels."""
    level_end = features(x_end, t_end.clamp(min=0), cond)
    if not conditional:
        return level_end
    return [torch.cat([a, b], dim=1) for a, b in zip(level_end, features(x_start, t_start, cond))]


def build_pair_heads(backbone, hidden: int = 64, T: int = 1000, conditional: bool = True) -> FeatureHeads:
    """Heads for SDXL-Lightning's discriminator: twice each level's channels when it also reads x_t (conditional)."""
    heads = build_heads(backbone, hidden, T)
    if not conditional:
        return heads
    channels = [head.body[0].in_channels * 2 for head in heads.heads]
    return FeatureHeads(channels, heads.text_dim, hidden, T)


def make_pair_discriminator(features, heads, conditional: bool = True):
    """SDXL-Lightning's D as the loss sees it (arXiv:2402.13929 §3.3): `(x_{t'}, t', x_t, t, cond) -> logits (B, L)`
    from a frozen feature callable and the heads, conditioned on t' and the text (and on x_t through its features)."""

    def discriminator(x_end, t_end, x_start, t_start, cond):
        levels = _pair_features(features, x_end, t_end, x_start, t_start, cond, conditional)
        return heads(levels, t_end.clamp(min=0), cond)

    return discriminator


class EncoderPairDiscriminator(torch.nn.Module):
    """SDXL-Lightning's D with a trainable backbone (its own encoder copy, the paper's choice) and the pair heads."""

    def __init__(self, encoder: torch.nn.Module, heads: FeatureHeads, conditional: bool = True):
        super().__init__()
        self.encoder, self.heads, self.conditional = encoder, heads, conditional
        self._features = transformer_encoder_features if is_transformer(encoder) else unet_encoder_features

    def forward(self, x_end, t_end, x_start, t_start, cond):
        def features(z, t, c):
            return self._features(self.encoder, z, t, c)
        levels = _pair_features(features, x_end, t_end, x_start, t_start, cond, self.conditional)
        return self.heads(levels, t_end.clamp(min=0), cond)
