"""Load teachers from a path or hub id, read their noise schedule, and build the full-LCD student.

The denoiser is the pipeline's `unet` (SDXL, SSD-1B, SD1.5/2.x) or its `transformer` (PixArt-α); lcm/roles.py wraps it
as the role callables `(z, t, cond, w=None) -> prediction`, so the loss never knows which backbone it trains.

Dtype policy (one place): frozen networks in the weight dtype (fp32 on CPU; fp16/bf16 follow mixed precision on GPU),
the VAE always fp32 for encoding (SDXL's VAE overflows in fp16), trainable parameters fp32, schedule tensors fp32.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from .errors import ModelError
from .schedule import NoiseSchedule, alphas_cumprod_from_config

logger = logging.getLogger(__name__)

PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline, "pixart": PixArtAlphaPipeline}

# The one dtype table: names as `lcm sample --dtype` takes them; accelerate's mixed-precision modes map onto it.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_DTYPES = {"no": DTYPES["fp32"], "fp16": DTYPES["fp16"], "bf16": DTYPES["bf16"]}  # train.mixed_precision → dtype


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """Frozen-weight dtype that matches accelerate's mixed-precision mode."""
    return WEIGHT_DTYPES[mixed_precision]


# What turns data into model inputs (and is all a latent cache replaces): the VAE, text encoders and tokenizers.
ENCODER_PREFIXES = ("vae", "text_encoder", "tokenizer")


def module_names(kind: str) -> tuple[str, ...]:
    """The pipeline components of `kind` (modules, tokenizers, scheduler), as its constructor names them."""
    cls = PIPELINES[kind]
    return tuple(cls._get_signature_keys(cls)[0])


def encoder_names(kind: str) -> tuple[str, ...]:
    """The components of `kind` that encode images or text (`vae`, `text_encoder_2`, `tokenizer`, …)."""
    return tuple(n for n in module_names(kind) if n.startswith(ENCODER_PREFIXES))


def load_pipeline(kind: str, pretrained: str, torch_dtype=torch.float32, revision=None, variant=None,
                  without: tuple[str, ...] = (), config_dir: Optional[str] = None):
    """The teacher pipeline: a diffusers folder or hub id, or one single-file checkpoint (see `load_pretrained`).

    Components named in `without` are not loaded (left None): training from a latent cache needs no encoders.
    """
    if kind not in PIPELINES:
        raise ValueError(f"unknown model.kind {kind!r}; valid: {sorted(PIPELINES)}")
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd15" else {}
    # `dtype` (diffusers >= 0.36 deprecates `torch_dtype`), per component for a folder: the VAE loads in fp32 for
    # encode/decode whatever the weight dtype; loading it so, rather than casting after, keeps diffusers' keep-in-fp32
    # logic intact. A single file takes one dtype, so its VAE is cast after.
    dtype = torch_dtype if is_single_file(pretrained) else {"default": torch_dtype, "vae": torch.float32}
    pipe = load_pretrained(PIPELINES[kind], pretrained, config_dir, torch_dtype=dtype, revision=revision,
                           variant=variant, **extra, **{name: None for name in without})
    if pipe.vae is not None and pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


# ------------------------------------------------------------------------------------------ single-file checkpoints
# Most SDXL fine-tunes are published as one `model.safetensors` (A1111/ComfyUI layout: `model.diffusion_model.*`,
# `first_stage_model.*`, `conditioner.embedders.{0,1}.*`). diffusers' `from_single_file` converts the weights, but the
# architecture (every config.json), the tokenizers and the scheduler must come from a diffusers-layout folder. We never
# let it ask the hub for them: the folder is `model.config_dir`, a folder beside the file, or a shipped reference.

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
ASSETS = Path(__file__).resolve().parent / "assets"
# Shipped diffusers-layout folders whose configs a matching single file may borrow. Full-size SDXL is not here: its
# tokenizers' vocab and merges files cannot be shipped offline (benchmarks/configs has only the architectures).
REFERENCE_CONFIGS = {"mini_teacher": ASSETS / "mini_teacher"}


class SingleFileError(ModelError):
    """A single-file checkpoint that cannot be loaded as asked (no configs, a component missing from the file)."""


def is_single_file(pretrained) -> bool:
    """The one decision between the loaders: a checkpoint file → `from_single_file`; a folder or hub id →
    `from_pretrained`. A weights-file name that does not exist is an error here rather than a hub lookup."""
    path = Path(str(pretrained))
    if path.is_file():
        return True
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise FileNotFoundError(f"model file {pretrained!r} does not exist")
    return False


def load_pretrained(cls, pretrained: str, config_dir: Optional[str] = None, **kwargs):
    """`cls.from_pretrained(pretrained, …)`, or for a single file `from_single_file` with configs from
    `single_file_configs`, fully offline (`local_files_only=True`). `cls` may be `DiffusionPipeline`: the pipeline
    class then comes from the config folder's model_index.json."""
    if not is_single_file(pretrained):
        if "torch_dtype" in kwargs:  # from_pretrained's name for it is `dtype` (diffusers >= 0.36 deprecates the old)
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        return cls.from_pretrained(pretrained, use_safetensors=True, **kwargs)
    revision, variant = kwargs.pop("revision", None), kwargs.pop("variant", None)
    if revision or variant:
        raise SingleFileError(f"model.revision / model.variant name versions of a hub repo; {pretrained} is one file")
    folder = single_file_configs(pretrained, config_dir)
    cls = _single_file_class(cls, folder)
    try:
        pipe = cls.from_single_file(str(pretrained), config=str(folder), local_files_only=True, **kwargs)
    except NotImplementedError as err:
        # diffusers builds each model on the meta device and fills it from the file; a tensor the file lacks stays
        # there, and its own device/dtype move then fails with torch's "Cannot copy out of meta tensor".
        if "meta tensor" not in str(err):
            raise
        raise SingleFileError(f"{pretrained}: tensors of the model are not in the file (diffusers left them "
                              f"unloaded); is it a checkpoint of the architecture {folder} describes?") from err
    check_fully_loaded(pipe.components, pretrained)
    return pipe


def load_unet(pretrained: str, config_dir: Optional[str] = None, torch_dtype=torch.float32):
    """The base model's UNet alone, from a diffusers folder / hub id or from a single file (offline, as above)."""
    from diffusers import UNet2DConditionModel

    if not is_single_file(pretrained):
        return UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", dtype=torch_dtype)
    folder = single_file_configs(pretrained, config_dir)
    unet = UNet2DConditionModel.from_single_file(str(pretrained), config=str(folder), subfolder="unet",
                                                 local_files_only=True, torch_dtype=torch_dtype)
    check_fully_loaded({"unet": unet}, pretrained)
    return unet


def config_source(pretrained: str, config_dir: Optional[str] = None) -> str:
    """Where a model's configs (model_index.json, scheduler, …) are read: the folder or hub id itself, or a single
    file's config folder."""
    return str(single_file_configs(pretrained, config_dir)) if is_single_file(pretrained) else pretrained


def _single_file_class(cls, folder: Path):
    """The pipeline class for `from_single_file`: `cls` itself, or model_index.json's for the generic loader."""
    import diffusers

    if cls is diffusers.DiffusionPipeline:
        cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    if not hasattr(cls, "from_single_file"):
        raise SingleFileError(f"{cls.__name__} has no single-file loader in diffusers; convert the model to a "
                              "diffusers folder (save_pretrained) and give that folder")
    return cls


def single_file_configs(checkpoint, config_dir: Optional[str] = None) -> Path:
    """The diffusers-layout folder (model_index.json, */config.json, tokenizers, scheduler) for a single file:
    `config_dir` when given, else the file's own folder when it holds model_index.json (a local copy of a hub repo that
    ships both layouts), else the shipped reference whose architecture matches the file's tensor shapes."""
    if config_dir is not None:
        if not (Path(config_dir) / "model_index.json").is_file():
            raise SingleFileError(f"model.config_dir={config_dir!r} is not a diffusers-layout folder (no "
                                  "model_index.json); it needs model_index.json, each component's config.json, the "
                                  "tokenizers and the scheduler config (the weights are not needed)")
        return Path(config_dir)
    beside = Path(checkpoint).parent
    if (beside / "model_index.json").is_file():
        return beside
    for folder in REFERENCE_CONFIGS.values():
        if _matches_reference(checkpoint, folder):
            logger.info("single file %s: configs from the shipped reference %s", checkpoint, folder)
            return folder
    raise SingleFileError(
        f"no configs for the single-file checkpoint {checkpoint}: set model.config_dir (CLI: --config-dir) to a "
        "diffusers-layout folder of the same architecture — model_index.json, unet/vae/text_encoder*/config.json, "
        "tokenizer*/ and scheduler/ (the weights are not needed; e.g. a local copy of the base model's diffusers "
        "repo). The hub is never asked.")


def _reference_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes a single file of `folder`'s SDXL architecture must have, from its configs: enough to tell
    architectures apart (loading still checks every tensor)."""
    def config(name):
        return json.loads((folder / name / "config.json").read_text())

    unet, vae, te1, te2 = config("unet"), config("vae"), config("text_encoder"), config("text_encoder_2")
    c0 = unet["block_out_channels"][0]
    return {"model.diffusion_model.input_blocks.0.0.weight": (c0, unet["in_channels"], 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": (4 * c0, unet["projection_class_embeddings_input_dim"]),
            "model.diffusion_model.out.2.weight": (unet["out_channels"], c0, 3, 3),
            "first_stage_model.encoder.conv_in.weight": (vae["block_out_channels"][0], vae["in_channels"], 3, 3),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
                (te1["vocab_size"], te1["hidden_size"]),
            "conditioner.embedders.1.model.token_embedding.weight": (te2["vocab_size"], te2["hidden_size"])}


def _matches_reference(checkpoint, folder: Path) -> bool:
    """Whether a .safetensors file has the reference's shapes (read from the header: no tensor is loaded)."""
    from safetensors import safe_open

    if Path(checkpoint).suffix.lower() != ".safetensors":
        return False
    with safe_open(str(checkpoint), framework="pt") as f:
        names = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in _reference_shapes(folder) if k in names}
    return shapes == _reference_shapes(folder)


def check_fully_loaded(components: dict, checkpoint) -> None:
    """Every parameter came from the file. diffusers leaves a tensor the file lacks on the meta device; its own
    device/dtype moves catch that for its models, but a text encoder loaded without a dtype keeps it silently, until
    the first forward fails far from the cause."""
    for name, module in components.items():
        if isinstance(module, torch.nn.Module):
            missing = [n for n, p in module.named_parameters() if p.is_meta]
            if missing:
                raise SingleFileError(f"{checkpoint}: {name} has {len(missing)} tensor(s) not in the file (first: "
                                      f"{missing[0]}); is it a checkpoint of this architecture?")


def denoiser_name(pipe) -> str:
    """The pipeline component that denoises: "transformer" (PixArt) or "unet"."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def denoiser_of(pipe):
    return getattr(pipe, denoiser_name(pipe))


def config_of(model):
    """The diffusers config, read through a DDP/FSDP wrapper (`.module`)."""
    return getattr(getattr(model, "module", model), "config", None)


def is_transformer(model) -> bool:
    """PixArt's DiT (it consumes T5 captions through `caption_channels`) rather than a UNet."""
    return "caption_channels" in (config_of(model) or {})


def noise_schedule_of(scheduler) -> NoiseSchedule:
    """Our NoiseSchedule from the teacher's scheduler config (its own betas: SD/SDXL scaled_linear, PixArt linear)."""
    c = scheduler.config
    return NoiseSchedule(alphas_cumprod_from_config(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end))


def student_from_teacher(teacher, w_embed_dim: int | None = 256):
    """Full-LCD student: the teacher's UNet plus a guidance-embedding input (`time_cond_proj_dim`), in fp32.

    The new projection `time_embedding.cond_proj` is zero-initialised, so at step 0 the student's output equals the
    teacher's for every w (a randomly initialised projection would start the student worse than its teacher).
    A PixArt transformer has no such input (and the stock pipeline would not feed one): its student is a plain fp32
    copy, distilled at a fixed w (PixArt-δ) or averaged over the w range.
    """
    from diffusers import UNet2DConditionModel

    if is_transformer(teacher) or w_embed_dim is None:  # None: a normal-CFG student, no w input
        logger.info("student without a guidance-embedding input: " + ("PixArt's transformer has none; w acts through "
                    "the teacher's CFG only" if is_transformer(teacher) else "normal CFG (sampled with real CFG)"))
        student = copy.deepcopy(teacher)
        return student.to(device=teacher.device, dtype=torch.float32).train().requires_grad_(True)

    student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": w_embed_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise ValueError(f"student/teacher mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(device=teacher.device, dtype=torch.float32).train().requires_grad_(True)
