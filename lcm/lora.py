"""LoRA on the denoiser through PEFT: add adapters, save and load them, and check a LoRA file fits and fully loads.

The teacher of LCM-LoRA is the same network with its adapters disabled (`lcm.roles.adapters_disabled`); the target is
the same network with the EMA adapter weights swapped in (`lcm.ema.swapped_weights`).

UNets carry diffusers' PEFT integration (`add_adapter`, `load_lora_weights` on the pipeline). PixArt's transformer has
none in diffusers, so there the adapter is injected with PEFT directly and saved in PEFT's own folder format
(`adapter_config.json` + `adapter_model.safetensors`), which `PeftModel.from_pretrained(pipe.transformer, folder)`
loads — the way PixArt's own LCM-LoRA is published.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from pathlib import Path

from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from .errors import LoraMismatchError

PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # how a PeftModel names the wrapped model's modules in its saved weights


def add_lora(model, rank: int, alpha: float, target_modules: Iterable[str], dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Attach a PEFT LoRA adapter ("default") to a frozen denoiser; returns the trainable LoRA parameters, in fp32."""
    model.requires_grad_(False)
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                            target_modules=list(target_modules))
    try:
        if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin (UNets)
            model.add_adapter(config)
        else:  # no diffusers integration (PixArt): inject with PEFT and record the config where PEFT's utils look
            inject_adapter_in_model(config, model, adapter_name="default")
            model.peft_config = {"default": config}
    except ValueError as err:  # PEFT's message does not name our config key; only its target-module errors are ours
        what = (f"lora.target_modules={list(target_modules)}" if "target module" in str(err).lower() else
                f"LoRA (lora.rank={rank}, lora.alpha={alpha}, lora.dropout={dropout})")
        raise ValueError(f"{what}: {err}") from err
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no module matched lora.target_modules={list(target_modules)}")
    for p in params:
        # Important: adapters train in fp32 even when the frozen base runs in fp16/bf16 (mixed-precision safety).
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter tensors in PEFT key format (`…to_q.lora_A.weight`), contiguous, on CPU.

    Kept in PEFT format on purpose: diffusers' `convert_state_dict_to_diffusers` rewrites only the attention keys to
    the legacy `.lora.down` form, and the loader then silently skipped them (caught by the reload test).
    """
    state = get_peft_model_state_dict(unet)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def lora_metadata(unet) -> dict:
    """PEFT adapter config (rank, alpha, targets) saved beside the weights so loaders rebuild the same adapter.

    PEFT holds `target_modules` as a set, whose iteration order follows Python's per-process string hashing: sorted
    here, so the same weights always write the same metadata (safetensors still orders its header map per process)."""
    config = unet.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def save_lora(model, out_dir, pipeline_cls) -> None:
    """UNet pipelines: `pytorch_lora_weights.safetensors`, so `pipe.load_lora_weights(out_dir)` works unchanged.
    Pipelines without a LoRA loader (PixArt): PEFT's folder format, for `PeftModel.from_pretrained(model, out_dir)`."""
    if hasattr(pipeline_cls, "save_lora_weights"):
        pipeline_cls.save_lora_weights(out_dir, unet_lora_layers=lora_state_dict(model),
                                       unet_lora_adapter_metadata=lora_metadata(model), safe_serialization=True)
        return
    out_dir = Path(out_dir)
    model.peft_config["default"].save_pretrained(str(out_dir))
    save_file({PEFT_KEY_PREFIX + k: v for k, v in lora_state_dict(model).items()}, str(out_dir / PEFT_WEIGHTS_FILE))


# `[unet.]<module path>.lora_A|lora_B[.<adapter>].weight` (PEFT) or `.lora.down|.lora.up` (diffusers' legacy names).
_LORA_KEY = re.compile(r"^(?:unet\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up)(?:\.[^.]+)?\.weight$")
_OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "lora_te", "lora_unet_")  # not UNet keys in PEFT form


def _expected_lora_shape(module, part: str, rank: int) -> tuple[int, ...] | None:
    """The shape a LoRA tensor must have on `module`: its existing adapter's if it carries one, else from the base."""
    down = part in ("lora_A", "lora.down")
    existing = getattr(module, "lora_A" if down else "lora_B", None)
    if isinstance(existing, torch.nn.ModuleDict) and "default" in existing:
        return tuple(existing["default"].weight.shape)
    base = getattr(module, "base_layer", module)
    if isinstance(base, torch.nn.Linear):
        return (rank, base.in_features) if down else (base.out_features, rank)
    if isinstance(base, torch.nn.Conv2d):
        return (rank, base.in_channels, *base.kernel_size) if down else (base.out_channels, rank, 1, 1)
    return None  # another layer type: nothing to check against


def check_lora_matches(unet, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the first UNet module (in model order) whose LoRA tensor does not fit.

    A LoRA trained on another base (other widths, another architecture) otherwise fails deep inside PEFT with a list
    of every mismatched tensor, or not at all where PEFT skips keys. Accepts our checkpoints (PEFT keys), diffusers
    files (`unet.` prefix), diffusers' legacy `.lora.down/.up` and attention-processor names (what kohya files become
    through `lora_state_dict(…, unet_config=…)`); text-encoder keys and unconverted kohya keys are ignored.
    Works on a plain UNet (sampling, before `load_lora_weights`) and on one already carrying the adapter (resume).
    """
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    # diffusers reads kohya attention keys as `….attn1.processor.to_q_lora.down.weight`; its own UNet → PEFT renaming
    # (the one `load_lora_adapter` applies) turns them into `….attn1.to_q.lora_A.weight`, which the pattern can read.
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in convert_unet_state_dict_to_peft(state_dict).items():
        match = None if key.startswith(_OTHER_COMPONENTS) else _LORA_KEY.match(key)
        if match:
            by_module.setdefault(match["module"], {})[match["part"]] = tensor
    modules = dict(unet.named_modules())
    for name, module in modules.items():
        for part, tensor in by_module.get(name, {}).items():
            rank = tensor.shape[0] if part in ("lora_A", "lora.down") else tensor.shape[1]
            want = _expected_lora_shape(module, part, rank)
            if want is not None and tuple(tensor.shape) != want:
                raise LoraMismatchError(
                    f"LoRA does not match this UNet (trained on a different base model, or another lora.rank?): "
                    f"first mismatch at module {name!r}: {part} has shape {tuple(tensor.shape)}, this UNet needs "
                    f"{want}")
    missing = [name for name in by_module if name not in modules]
    if missing:
        raise LoraMismatchError(f"LoRA does not match this UNet: it adapts {len(missing)} module(s) the UNet does not have, "
                         f"first: {missing[0]!r}")


def load_lora_into_training_unet(unet, state_dict: dict[str, torch.Tensor], source="the checkpoint") -> None:
    """Load adapter tensors saved by `get_peft_model_state_dict` back into a UNet carrying the "default" adapter;
    every tensor must land (`check_lora_landed`), or the resumed run would train from a partly fresh adapter."""
    check_lora_matches(unet, state_dict)
    set_peft_model_state_dict(unet, state_dict, adapter_name="default")
    check_lora_landed(state_dict, [unet], "default", source)


# ------------------------------------------------------------------------------------------- completeness on load
# diffusers/PEFT only *warn* when a LoRA file's keys land on no module (PEFT's "inconsistency … additional target
# modules" RuntimeWarning, diffusers' "unexpected keys" log line), then sample with whatever part did load. A file from
# diffusers' reference LCM script is the common case: its attention keys are in the legacy `.lora.down` form, which
# `load_lora_weights` skips whenever the file's first key is in PEFT form. So every load is followed by this check.

_KOHYA_ALPHA = ".alpha"  # kohya's per-module scalar: it becomes the adapter's scale (config), not a tensor on a module


class LoRALoadError(LoraMismatchError):
    """A LoRA file whose tensors did not all land on the model: refused rather than sampled half-loaded."""


def adapter_tensors(models: Iterable[torch.nn.Module], adapter_name: str) -> list[torch.Tensor]:
    """Every tensor adapter `adapter_name` holds on `models` (lora_A/B, DoRA magnitudes, embedding LoRA)."""
    # PEFT keeps one entry per adapter: `<module>.lora_A.<adapter>.weight`, `<module>.lora_embedding_A.<adapter>`.
    owned = re.compile(rf"\.lora_\w+\.{re.escape(adapter_name)}(?:\.|$)")
    return [p for model in models for name, p in model.named_parameters() if owned.search(name)]


def _fingerprint(t: torch.Tensor, dtype: torch.dtype) -> tuple:
    """Shape + exact bytes of `t` in `dtype`: equal fingerprints ⇔ equal tensors (loading only casts and copies)."""
    t = t.detach().to(device="cpu", dtype=dtype).contiguous()
    return tuple(t.shape), str(dtype), bytes(t.reshape(-1).view(torch.uint8).numpy())


def unlanded_lora_keys(file_tensors: dict[str, torch.Tensor], models: Iterable[torch.nn.Module],
                       adapter_name: str) -> list[str]:
    """Keys of `file_tensors` whose tensor is not among the adapter's tensors on `models`, in file order.

    Matched by value, not by name: diffusers renames kohya/SGM/legacy keys on the way in (a pure rename, plus a cast
    to the model's dtype), so what landed is recognisable by its values whatever the file called it. Each landed
    tensor is claimed once, so a file tensor can never be counted as loaded on another tensor's behalf.
    """
    landed = adapter_tensors(models, adapter_name)
    dtypes = sorted({p.dtype for p in landed}, key=str)
    free: dict[tuple, int] = {}
    for p in landed:
        key = _fingerprint(p, p.dtype)
        free[key] = free.get(key, 0) + 1
    lost = []
    for key, tensor in file_tensors.items():
        if key.endswith(_KOHYA_ALPHA) and tensor.numel() == 1:
            continue
        match = next((fp for fp in (_fingerprint(tensor, d) for d in dtypes) if free.get(fp, 0) > 0), None)
        if match is None:
            lost.append(key)
        else:
            free[match] -= 1
    return lost


def check_lora_landed(file_tensors: dict[str, torch.Tensor], models: Iterable[torch.nn.Module], adapter_name: str,
                      source) -> None:
    """Raise LoRALoadError unless every tensor of the LoRA file `source` sits on `models` under `adapter_name`."""
    lost = unlanded_lora_keys(file_tensors, models, adapter_name)
    if not lost:
        return
    total = sum(1 for k, t in file_tensors.items() if not (k.endswith(_KOHYA_ALPHA) and t.numel() == 1))
    first = ", ".join(repr(k) for k in lost[:3])
    raise LoRALoadError(
        f"LoRA {source} did not fully load: {len(lost)} of its {total} tensors landed on no module of this model "
        f"(first: {first}{', …' if len(lost) > 3 else ''}). Sampling with the rest would silently give wrong images, so "
        "it is refused. Check that the LoRA was trained for this base model; if it was, its key names are ones "
        "diffusers cannot place: re-save it in diffusers' PEFT form (`unet.<module>.lora_A.weight` / `.lora_B.weight`, "
        "as `get_peft_model_state_dict` writes, not converted with `convert_state_dict_to_diffusers`) or in kohya "
        "form (`lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`).")


def lora_file(path: Path) -> Path:
    """The weights file of a resolved LoRA path: the file itself, or the folder's diffusers weights file."""
    return path if path.is_file() else path / "pytorch_lora_weights.safetensors"


def lora_load_args(lora: Path) -> dict:
    """Keyword arguments for diffusers' `load_lora_weights` / `lora_state_dict` from a resolved LoRA path."""
    if lora.is_file():
        return {"pretrained_model_name_or_path_or_dict": str(lora.parent), "weight_name": lora.name}
    return {"pretrained_model_name_or_path_or_dict": str(lora)}


def load_pipeline_lora(pipe, path: Path, adapter_name: str) -> None:
    """`pipe.load_lora_weights` for a resolved LoRA path (folder or file), refusing a LoRA that does not fit this
    UNet or does not fully load. Reads kohya/SGM names through the UNet's config, as `load_lora_weights` does."""
    from safetensors.torch import load_file

    where = lora_load_args(path)
    # Without unet_config diffusers leaves kohya's SGM names (`input_blocks_4_1_…`) unmapped, and the shape check
    # would see modules this UNet does not have.
    state = type(pipe).lora_state_dict(**where, unet_config=pipe.unet.config)[0]
    check_lora_matches(pipe.unet, state)  # another base: the first mismatched module named, before PEFT's wall of text
    pipe.load_lora_weights(**where, adapter_name=adapter_name)
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    try:
        check_lora_landed(load_file(str(lora_file(path))), models, adapter_name, lora_file(path))
    except LoRALoadError:
        pipe.delete_adapters(adapter_name)  # leave the pipeline as it was (evaluate reuses it)
        raise
