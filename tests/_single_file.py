"""Write a diffusers SDXL pipeline as one A1111/ComfyUI-style checkpoint (SGM/LDM key names), for the single-file tests.

The names are the ones SDXL's own `sd_xl_base_1.0.safetensors` uses, read off diffusers' reverse conversion in
`diffusers/loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`):
- UNet `model.diffusion_model.*`: the SGM block numbering, from `lcm.export.sgm_module_path` (the kohya exporter's);
- VAE `first_stage_model.*`: LDM's `encoder.down.I.block.J`, `mid.block_1`, `mid.attn_1.{q,k,v,proj_out}` (1×1
  convolutions), and the decoder's up blocks numbered in reverse;
- text encoder 1 (CLIP ViT-L) `conditioner.embedders.0.transformer.text_model.*`: the transformers names;
- text encoder 2 (OpenCLIP bigG) `conditioner.embedders.1.model.*`: open_clip's names, q/k/v fused into `in_proj`,
  `text_projection` stored as (width, embed dim), the transpose of the transformers Linear weight.
"""

from __future__ import annotations

import re

import torch

from lcm.export import sgm_module_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def unet_to_sgm(unet) -> dict[str, torch.Tensor]:
    return {UNET_PREFIX + sgm_module_path(k, unet.config): v for k, v in unet.state_dict().items()}


def _vae_name(key: str, n_up: int) -> str:
    """One diffusers AutoencoderKL parameter name → its LDM name (without the `first_stage_model.` prefix)."""
    for old, new in (("conv_norm_out", "norm_out"), ("mid_block.resnets.0", "mid.block_1"),
                     ("mid_block.resnets.1", "mid.block_2")):
        key = key.replace(old, new)
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        coder, way, block, kind, index, rest = m.groups()
        block = int(block) if way == "down" else n_up - 1 - int(block)  # LDM counts the decoder's blocks upwards
        if kind == "resnets":
            name = rest.split(".")[0]
            return f"{coder}.{way}.{block}.block.{index}.{rest.replace(name, _VAE_RESNET.get(name, name), 1)}"
        return f"{coder}.{way}.{block}.{'downsample' if way == 'down' else 'upsample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key)
    if m:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    return key


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    out = {}
    n_up = len(vae.config.up_block_types)
    for key, value in vae.state_dict().items():
        name = _vae_name(key, n_up)
        if ".attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1×1 convolutions
        out[VAE_PREFIX + name] = value
    return out


def clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 flattens CLIPTextModel (no `text_model.`); the file spells it, as SDXL's does."""
    state = text_encoder.state_dict()
    return {CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def open_clip_to_ldm(text_encoder_2) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T.contiguous()}
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat([state.pop(f"{src}self_attn.{p}_proj.{part}")
                                                          for p in "qkv"])
            for old, new in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{new}.{part}"] = state.pop(f"{src}{old}.{part}")
    if state:
        raise ValueError(f"unconverted text encoder 2 tensors: {sorted(state)[:3]}")
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def sdxl_to_single_file(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline's weights under the SGM/LDM names of one SDXL checkpoint file."""
    return {**unet_to_sgm(pipe.unet), **vae_to_ldm(pipe.vae), **clip_to_ldm(pipe.text_encoder),
            **open_clip_to_ldm(pipe.text_encoder_2)}


def save_single_file(pipe, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sdxl_to_single_file(pipe).items()}, str(path))


def config_only_copy(pipeline_dir, out_dir):
    """The pipeline folder without its weights: what `model.config_dir` needs (configs + tokenizers)."""
    import shutil
    from pathlib import Path

    shutil.copytree(pipeline_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return Path(out_dir)
