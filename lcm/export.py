"""Final artefacts of a run: diffusers-format LoRA, the LCMScheduler config, a model card; and `lcm export`,
which rewrites a finished run's LoRA as kohya keys (ComfyUI/A1111) or merges it into a fused UNet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import PathNotFoundError, write_guard
from .guidance import guidance_scale_from_w
from .lora import check_lora_landed, save_lora
from .models import PIPELINES
from .objectives import base_objective
from .presets import rule_spans, rule_text, spread_text, stock_eta, stock_eta_text
from .sampling import mix_rule, student_scheduler_for


def export_lora_run(model, pipeline_cls, teacher_scheduler_config, cfg, final_dir: Path, steps_trained: int,
                    data_summary: str = "") -> Path:
    """Write `final/` so `pipe.load_lora_weights(final)` (PixArt: `PeftModel.from_pretrained(pipe.transformer, final)`)
    and `LCMScheduler.from_pretrained(final/'scheduler')` work."""
    final_dir = Path(final_dir)
    with write_guard(final_dir):  # a full disk names the folder and the free space, not "unexpected pos"
        final_dir.mkdir(parents=True, exist_ok=True)
        save_lora(model, final_dir, pipeline_cls)
        return _write_scheduler_and_card(teacher_scheduler_config, cfg, final_dir, steps_trained, data_summary)


def export_unet_run(model, teacher_scheduler_config, cfg, final_dir: Path, steps_trained: int,
                    data_summary: str = "", subfolder: str = "unet") -> Path:
    """Full LCD: `final/unet` (a UNet with a guidance embedding; PixArt: `final/transformer`), loadable into the stock
    pipeline, + scheduler + card."""
    final_dir = Path(final_dir)
    with write_guard(final_dir):
        final_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(final_dir / subfolder), safe_serialization=True)
        return _write_scheduler_and_card(teacher_scheduler_config, cfg, final_dir, steps_trained, data_summary)


def _write_scheduler_and_card(teacher_scheduler_config, cfg, final_dir: Path, steps_trained: int,
                              data_summary: str) -> Path:
    """`final/scheduler` (the objective's scheduler on the teacher's betas: LCMScheduler with original_inference_steps
    = N for consistency students, the `turbo` preset's for ADD) and `final/README.md`."""
    scheduler = student_scheduler_for(cfg.distill, teacher_scheduler_config)
    scheduler.save_pretrained(str(final_dir / "scheduler"))
    (final_dir / "README.md").write_text(model_card(cfg, steps_trained, data_summary))
    return final_dir


def _base_load_line(cfg) -> str:
    """How the card's snippet loads the base: from_pretrained, or from_single_file with the run's config folder."""
    from .models import config_source, is_single_file

    base = cfg.model.pretrained
    if not is_single_file(base):
        return f'pipe = DiffusionPipeline.from_pretrained("{base}")'
    cls = PIPELINES[cfg.model.kind].__name__
    return (f'from diffusers import {cls}\n'
            f'pipe = {cls}.from_single_file("{base}", config="{config_source(base, cfg.model.get("config_dir"))}")')


def _objective_summary(cfg) -> str:
    """The objective and, for the adversarial ones, the discriminator's settings, for the card's table."""
    objective = cfg.distill.get("objective", "lcd")
    base = base_objective(objective)
    if base in ("pcm", "tcd"):
        m = cfg.distill.phases
        rule = mix_rule(cfg.distill)
        summary = (f"pcm (phased consistency): {m} phases of {cfg.distill.num_ddim_timesteps // m} grid points; "
                   f"sample with {m} steps" if base == "pcm" else
                   "tcd (trajectory consistency): s ~ U[0, t_n]; " + (
                       f"validated with gamma = {cfg.distill.tcd_gamma}" if rule is None else
                       f"a share {cfg.distill.tcd_clean_share} of the rows aims at the clean end (LCD's target), so "
                       f"`lcm sample` picks {rule}: {rule_text(rule)}"))
        return summary if objective == base else f"{summary}; plus {_adversarial_summary(cfg, objective)}"
    if objective == "lcd":
        return "lcd (consistency distillation)"
    a = cfg.adversarial
    if objective == "lightning":
        d = cfg.distill
        return (f"lightning (progressive adversarial): stages {list(d.stages)} "
                f"({'even split' if d.stage_steps is None else list(d.stage_steps)} steps), the first {d.mse_stages} "
                f"with MSE; {'conditional' if a.conditional else 'relaxed (unconditional)'} {a.loss} discriminator "
                f"on the {a.backbone} teacher encoder, weight {a.weight}, R1 γ {a.r1_gamma}; teacher {d.teacher_steps} "
                f"DDIM steps per trajectory{'; x₀ prediction at 1 step' if d.stages[-1] == 1 and d.x0_one_step else ''}")
    return _adversarial_summary(cfg, objective)


def _adversarial_summary(cfg, objective: str) -> str:
    a = cfg.adversarial
    parts = [f"{objective}: {a.loss} loss, weight {a.weight} (warm-up {a.warmup_steps} steps), R1 γ {a.r1_gamma}",
             f"discriminator heads on the {a.backbone} teacher encoder, t̂ logit-normal({a.t_hat_loc}, "
             f"{a.t_hat_scale}) shift {a.t_hat_shift}"]
    if objective == "add":
        parts.append(f"student timesteps {list(a.student_timesteps)}, λ {a.distill_weight} ({a.distill_weighting})")
    return "; ".join(parts)


NORMAL_CFG_TAG = "normal-cfg"  # the model card tag `lcm sample` reads to tell a normal-CFG student from a distilled-CFG one


def is_normal_cfg(folder) -> bool | None:
    """Whether the student in `folder` (its model card, README.md) was distilled without guidance; None: no card."""
    from pathlib import Path

    card = Path(folder) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    front = text.split("---")[1] if text.startswith("---") else ""  # the YAML front matter holds the tags
    return NORMAL_CFG_TAG in front


def model_card(cfg, steps_trained: int, data_summary: str = "") -> str:
    """A short model card: base, data, training, and how to sample."""
    d = cfg.distill
    lora, pixart = "lora" in cfg, cfg.model.kind == "pixart"
    what = (f"rank {cfg.lora.rank}, alpha {cfg.lora.alpha}" if lora else "whole transformer (no w input)" if pixart
            else f"whole UNet, w-embedding dim {d.w_embed_dim}")
    g_student = 1.0 if lora or pixart else guidance_scale_from_w((d.w_min + d.w_max) / 2)
    guidance = ("`guidance_scale` 1.0–2.0 with `LCMScheduler`\n(the guidance was distilled in; values above 2 "
                "over-saturate, and ≤ 1 makes negative prompts inert)" if lora or pixart else
                f"`guidance_scale` = w + 1 with w in the trained range [{d.w_min}, {d.w_max}]: the pipeline feeds "
                "guidance_scale − 1 = w to the UNet's guidance embedding and runs no unconditional pass")
    if pixart and lora:
        load = ('from peft import PeftModel\n'
                'pipe.transformer = PeftModel.from_pretrained(pipe.transformer, "path/to/this/folder")')
    elif lora:
        load = 'pipe.load_lora_weights("path/to/this/folder")'
    else:
        sub, cls = ("transformer", "PixArtTransformer2DModel") if pixart else ("unet", "UNet2DConditionModel")
        load = (f'from diffusers import {cls}\n'
                f'pipe.{sub} = {cls}.from_pretrained("path/to/this/folder", subfolder="{sub}")')
    objective = base_objective(d.get("objective", "lcd"))  # an *_adv student samples like its base objective
    title, method, sched_cls, steps = (
        ("LCM-LoRA" if lora else "LCM (full distillation)", "latent consistency distillation", "LCMScheduler", 4)
        if objective != "add" else
        ("ADD-LoRA" if lora else "ADD (full distillation)", "adversarial diffusion distillation (SDXL-Turbo's ADD)",
         "EulerAncestralDiscreteScheduler", 1))
    if objective == "pcm":
        title, method, sched_cls, steps = (("PCM-LoRA" if lora else "PCM (full distillation)"),
                                           "phased consistency distillation", "DDIMScheduler", d.phases)
        guidance = guidance.replace("`LCMScheduler`", f"`DDIMScheduler` on trailing timesteps at exactly {d.phases} "
                                                       "steps, one per trained phase (`lcm sample --preset pcm`)")
    elif objective == "lightning":
        steps = d.stages[-1]
        title, method, sched_cls = (("Lightning-LoRA" if lora else "Lightning (full distillation)"),
                                    "progressive adversarial distillation (SDXL-Lightning)", "EulerDiscreteScheduler")
        preset = "lightning-1step" if steps == 1 and d.x0_one_step else "lightning"
        g_student = 0.0 if lora or pixart else g_student
        guidance = (f"`guidance_scale` 0 with `EulerDiscreteScheduler` on trailing timesteps at exactly {steps} "
                    f"step{'s' if steps > 1 else ''} (`lcm sample --preset {preset}`); the teacher's guidance was "
                    "distilled in" if lora or pixart else
                    f"`EulerDiscreteScheduler` on trailing timesteps at {steps} steps, `guidance_scale` = w + 1 with w "
                    f"in the trained range [{d.w_min}, {d.w_max}] (fed to the guidance embedding; no unconditional pass)")
    elif objective == "tcd":
        title, method, sched_cls = (("TCD-LoRA" if lora else "TCD (full distillation)"),
                                    "trajectory consistency distillation", "TCDScheduler")
        rule = mix_rule(d)
        if rule is not None:  # sampled by step count, which `eta` alone expresses
            eta, spread = stock_eta(rule, steps), spread_text(rule, d.num_ddim_timesteps)
            guidance = (guidance.replace("`LCMScheduler`", f"`TCDScheduler` and `eta` (gamma) by step count "
                                                            f"({stock_eta_text(rule)})")
                        + f". `lcm sample` follows the same rule (preset {rule}), but samples the eta-1.0 steps "
                          "with `LCMScheduler`, which scores the same at 2 steps and slightly better at 1"
                        + (f". {spread.rstrip('.')}" if spread else ""))
        else:
            eta = d.tcd_gamma
            guidance = guidance.replace("`LCMScheduler`", f"`TCDScheduler` and `eta` (gamma) = {d.tcd_gamma}, the "
                                                           "value validation used (`lcm sample --preset tcd`)")
    if objective == "add" and (lora or pixart):
        g_student, guidance = 0.0, ("`guidance_scale` 0 with `EulerAncestralDiscreteScheduler` on trailing timesteps "
                                    "(`lcm sample --preset turbo`); the teacher's guidance was distilled in")
    elif objective == "add":  # a whole UNet with a w-embedding: the pipeline feeds it guidance_scale − 1
        guidance = (f"`EulerAncestralDiscreteScheduler` on trailing timesteps, `guidance_scale` = w + 1 with w in the "
                    f"trained range [{d.w_min}, {d.w_max}] (fed to the guidance embedding; no unconditional pass)")
    if not d.get("teacher_cfg", True):  # normal CFG: the unguided teacher was distilled; guidance is the sampler's
        g_student, guidance = 4.0, (f"`guidance_scale` 3–8 with `{sched_cls}`, negative prompts welcome: this is a "
                                    "*normal-CFG* student (distilled from the teacher's unguided ODE), so classifier-"
                                    "free guidance runs at sampling as with the base model")
    return f"""---
library_name: diffusers
base_model: {cfg.model.pretrained}
tags: [lcm, {'lcm-lora' if lora else 'lcm-full'}, {d.get('objective', 'lcd')}, {cfg.model.kind}{'' if d.get('teacher_cfg', True) else ', ' + NORMAL_CFG_TAG}]
---
# {title} for `{cfg.model.pretrained}`

Distilled with [lcm-distill](https://pypi.org/project/lcm-distill/) by {method}.

| | |
|---|---|
| base model | `{cfg.model.pretrained}` ({cfg.model.kind}) |
| data | `{cfg.data.path}` ({cfg.data.source}, {cfg.data.resolution} px){' — ' + data_summary if data_summary else ''} |
| optimiser steps | {steps_trained} × batch {cfg.train.batch_size} × accumulation {cfg.train.gradient_accumulation_steps} |
| trained | {what} |
| teacher grid | N = {d.num_ddim_timesteps} ({d.solver}), {f"guidance w ∈ [{d.w_min}, {d.w_max}] (LCM convention; diffusers guidance_scale = w + 1 ∈ [{guidance_scale_from_w(d.w_min)}, {guidance_scale_from_w(d.w_max)}])" if d.get('teacher_cfg', True) else "no guidance (normal CFG: the teacher's unguided ODE)"} |
| loss | {d.loss}{f' (c = {d.huber_c})' if d.loss == 'huber' else ''}, EMA decay {d.ema_decay} |
| objective | {_objective_summary(cfg)} |

**Recommended sampling:** {f'{d.phases} steps' if objective == 'pcm' else f'{steps} step(s)' if objective == 'lightning' else '4 steps (2–8 work)' if objective != 'add' else '1 step (up to 4 work)'}, {guidance}.

```python
from diffusers import DiffusionPipeline, {sched_cls}
{_base_load_line(cfg)}
{load}
pipe.scheduler = {sched_cls}.from_pretrained("path/to/this/folder", subfolder="scheduler")
image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={g_student}{f", eta={eta}" if objective == "tcd" else ""}).images[0]
```
{_lcd_tcd_tip(d.num_ddim_timesteps) if objective in ("lcd", "lcd_adv") else ""}"""


def _lcd_tcd_tip(grid_steps: int) -> str:
    """A consistency student's card: from 4 steps `TCDScheduler` samples it better than LCMScheduler, at the etas of
    lcm-auto, the rule `lcm sample` uses for it, and from 7 steps on timesteps spread down to the bottom of its grid of
    `grid_steps` points (README, issue #13: 8-step FD 30.8 against LCMScheduler's 43.1 on the mini teacher)."""
    spans = rule_spans("lcm-auto")
    tcd = ", ".join(f"`eta={eta}` {span}" for _, span, rule, eta in spans if rule.startswith("tcd"))
    keep = " and ".join(span for _, span, rule, _ in spans if rule == "lcm")
    listed = spread_text("lcm-auto", grid_steps)
    first = next(low for low, _, rule, _ in spans if rule.startswith("tcd"))
    return (f"\nFrom {first} steps, `TCDScheduler` samples the same weights better than `LCMScheduler` (which "
            "re-noises fully at every step): `pipe.scheduler = "
            f"TCDScheduler.from_config(pipe.scheduler.config)`, then `pipe(..., eta=…)` with {tcd}.{' ' * bool(listed)}"
            f"{listed} "
            f"{keep.capitalize()} keep `LCMScheduler`. `lcm sample` follows this rule by itself (preset lcm-auto).\n")


# ------------------------------------------------------------------------------------------------ `lcm export RUN …`
# A run's `final/` holds the LoRA in diffusers' PEFT key format; `lcm export` rewrites it for other tools.

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lcm_lora_kohya.safetensors"
FUSED_DIR = "unet"

# SGM/LDM names of the ResBlock sub-modules (kohya's SDXL UNet) for diffusers' ResnetBlock2D names.
_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# Modules outside the down/mid/up blocks.
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_SGM_MID = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}


def _sgm_inner(kind: str, rest: list[str]) -> str:
    """The path inside one block: ResBlock layers are renamed; transformer and sampler layers keep their names."""
    if kind == "resnets" and rest and rest[0] in _SGM_RESNET:
        rest = [_SGM_RESNET[rest[0]], *rest[1:]]
    return ".".join(rest)


def sgm_module_path(path: str, unet_config) -> str:
    """diffusers UNet module path → the SGM/LDM name (`input_blocks.4.1.…`), from the config's block layout.

    SGM numbers the blocks flat: input block 0 is conv_in, then per down block `layers_per_block` (ResBlock,
    transformer) entries and, except after the last block, one downsampler entry; the middle block is (ResBlock,
    transformer, ResBlock); each up block has `layers_per_block + 1` entries, the last one also holding the upsampler
    (at index 2 after a transformer, 1 without). Nothing here assumes SDXL's real block counts.
    """
    lpb = unet_config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"kohya SGM naming needs one layers_per_block for all blocks, got {lpb!r}")
    for name, sgm in _SGM_TOP.items():
        if path == name or path.startswith(name + "."):
            return sgm + path[len(name):]
    parts = path.split(".")
    if parts[0] == "mid_block":
        return f"{_SGM_MID['.'.join(parts[1:3])]}.{_sgm_inner(parts[1], parts[3:])}"
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 5:
        raise ValueError(f"no SGM name for UNet module {path!r}")
    block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        return _sgm_input_block(block, kind, index, rest, lpb)
    return _sgm_output_block(block, kind, index, rest, lpb, "Attn" in unet_config["up_block_types"][block])


def _sgm_input_block(block: int, kind: str, index: int, rest: list[str], lpb: int) -> str:
    """down_blocks.B.{resnets,attentions,downsamplers}.I.… → input_blocks.N.{0,1}.…"""
    if kind == "downsamplers":  # the entry after the block's layers; SGM calls the downsampling conv `op`
        return f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.{'.'.join(['op', *rest[1:]])}"
    n = 1 + block * (lpb + 1) + index  # + 1: input block 0 is conv_in
    return f"input_blocks.{n}.{['resnets', 'attentions'].index(kind)}.{_sgm_inner(kind, rest)}"


def _sgm_output_block(block: int, kind: str, index: int, rest: list[str], lpb: int, has_attention: bool) -> str:
    """up_blocks.B.{resnets,attentions,upsamplers}.I.… → output_blocks.N.{0,1,2}.…"""
    if kind == "upsamplers":  # inside the block's last entry, after its ResBlock (and transformer, if any)
        return f"output_blocks.{block * (lpb + 1) + lpb}.{2 if has_attention else 1}.{'.'.join(rest)}"
    n = block * (lpb + 1) + index
    return f"output_blocks.{n}.{['resnets', 'attentions'].index(kind)}.{_sgm_inner(kind, rest)}"


# Which module naming the kohya keys use, per model kind: kohya's sd-scripts trains SDXL on its own SGM UNet (so
# SDXL LoRAs in the wild, and what ComfyUI/A1111 expect, say `input_blocks_4_1_…`) but SD1.x on the diffusers UNet.
KOHYA_NAMING = {
    "sdxl": sgm_module_path,
    "sd15": lambda path, unet_config: path,
}


def kohya_name(path: str, unet_config, kind: str = "sdxl") -> str:
    """`down_blocks.1.attentions.0.….to_q` → `lora_unet_input_blocks_4_1_…_to_q` (the kohya module name)."""
    if kind not in KOHYA_NAMING:
        raise ValueError(f"no kohya naming for model kind {kind!r}; valid: {sorted(KOHYA_NAMING)}")
    return "lora_unet_" + KOHYA_NAMING[kind](path, unet_config).replace(".", "_")


def read_lora_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers LoRA file: its tensors and its PEFT adapter config (from the `lora_adapter_metadata` header)."""
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata() or {}
    if "lora_adapter_metadata" not in header:
        raise ValueError(f"{path} has no lora_adapter_metadata header: rank/alpha unknown")
    meta = json.loads(header["lora_adapter_metadata"])
    return state, {k.removeprefix("unet."): v for k, v in meta.items() if k.startswith("unet.")}


def peft_to_kohya(state: dict[str, torch.Tensor], adapter: dict, unet_config, kind: str = "sdxl") -> dict:
    """PEFT keys (`unet.<path>.lora_A.weight`) → kohya keys (`lora_unet_<name>.lora_down.weight`, `.lora_up.weight`,
    `.alpha`). Same tensors: both apply W + (alpha / rank) · up @ down, with kohya's rank = lora_down's rows."""
    if adapter.get("use_rslora") or adapter.get("use_dora") or adapter.get("alpha_pattern"):
        raise ValueError("kohya export supports plain LoRA with one alpha (no rsLoRA, DoRA or alpha_pattern)")
    if any(not k.startswith("unet.") for k in state):
        raise ValueError("kohya export covers UNet adapters only; this file has text-encoder adapters too")
    out = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len("unet."):-len(".lora_A.weight")]
        name = kohya_name(path, unet_config, kind)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        up = state.get(f"unet.{path}.lora_B.weight")
        if up is None:
            raise ValueError(f"{key} has no matching lora_B")
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(adapter["lora_alpha"]))  # 0-d, as kohya writes it
    if len(out) != 3 * len(state) // 2:  # each (lora_A, lora_B) pair became (down, up, alpha)
        raise ValueError("unexpected LoRA tensors: only lora_A/lora_B weight pairs can be exported to kohya")
    return out


def check_kohya_round_trip(kohya: dict, peft_state: dict, unet_config, kind: str = "sdxl") -> None:
    """Read `kohya` back through diffusers' own kohya converter; every tensor must land on the module it came from."""
    from diffusers.configuration_utils import FrozenDict
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    converted, alphas = PIPELINES[kind].lora_state_dict(dict(kohya), unet_config=FrozenDict(unet_config))
    back = convert_unet_state_dict_to_peft(converted)
    lost = sorted(set(peft_state) - set(back))
    if lost or any(not torch.equal(back[k], peft_state[k]) for k in peft_state):
        first = lost[0] if lost else "a tensor"
        raise ValueError(f"kohya naming does not round-trip through diffusers' loader for this UNet ({first} is "
                         "misplaced); refusing to write a file that would load wrongly")
    if len(set(alphas.values())) > 1:
        raise ValueError(f"kohya alphas read back as several values {sorted(set(alphas.values()))}")


def read_run(run) -> tuple[Path, DictConfig]:
    """A training run folder → (its `final/` folder, its resolved config.yaml)."""
    run = Path(run)
    final, config = run / "final", run / "config.yaml"
    if not config.is_file():
        raise PathNotFoundError(f"{run} is not a finished training run: {config} is missing")
    cfg = OmegaConf.load(config)
    if cfg.model.get("kind") == "pixart":  # kohya/ComfyUI naming and diffusers' fusing are UNet-only
        raise ValueError(f"lcm export covers UNet LoRAs; {run} is a PixArt run, whose final/ is already in PEFT's "
                         "format (PeftModel.from_pretrained(pipe.transformer, final)); lcm sample merges it")
    if not (final / LORA_FILE).is_file():
        raise PathNotFoundError(f"{run} is not a finished training run: {final / LORA_FILE} is missing")
    return final, cfg


def base_unet_with_run_lora(final: Path, base: str, dtype: torch.dtype = torch.float32, config_dir=None):
    """The base UNet carrying the run's LoRA as adapter "lcm"; refused (LoRALoadError) unless every tensor landed.

    Every export goes through this, so no format is written from a LoRA that would load only in part.
    """
    from .models import load_unet

    unet = load_unet(base, config_dir, torch_dtype=dtype)  # a diffusers folder, hub id or single file
    unet.load_lora_adapter(str(final), weight_name=LORA_FILE, prefix="unet", adapter_name="lcm")
    check_lora_landed(load_file(str(final / LORA_FILE)), [unet], "lcm", final / LORA_FILE)
    return unet


def export_diffusers(final: Path, cfg, base: str, out: Path) -> Path:
    """Copy the diffusers-format LoRA (+ LCMScheduler config and card): `pipe.load_lora_weights(out)` works."""
    # a check only: half precision halves its memory
    base_unet_with_run_lora(final, base, torch.float16, cfg.model.get("config_dir"))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(final / LORA_FILE, out / LORA_FILE)
    for extra in ("scheduler", "README.md"):
        src = final / extra
        if src.is_dir():
            shutil.copytree(src, out / extra, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, out / extra)
    return out / LORA_FILE


def export_kohya(final: Path, cfg, base: str, out: Path) -> Path:
    """kohya/ComfyUI/A1111 keys (`lora_unet_…` + `.alpha`), checked against diffusers' kohya loader before writing:
    the names round-trip, and the kohya tensors all land on the base UNet."""
    from diffusers.configuration_utils import FrozenDict

    kind = cfg.model.get("kind", "sdxl")
    unet = base_unet_with_run_lora(final, base, torch.float16, cfg.model.get("config_dir"))
    unet_config = dict(unet.config)
    state, adapter = read_lora_file(final / LORA_FILE)
    kohya = peft_to_kohya(state, adapter, unet_config, kind)
    check_kohya_round_trip(kohya, state, unet_config, kind)
    converted, alphas = PIPELINES[kind].lora_state_dict(dict(kohya), unet_config=FrozenDict(unet_config))
    unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name="kohya")
    check_lora_landed(kohya, [unet], "kohya", out / KOHYA_FILE)
    out.mkdir(parents=True, exist_ok=True)
    # ss_* keys are the ones kohya's own tools write; A1111/ComfyUI only read the tensors.
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(adapter["r"]),
            "ss_network_alpha": str(adapter["lora_alpha"]), "ss_base_model": str(base), "ss_model_kind": kind}
    save_file(kohya, str(out / KOHYA_FILE), metadata=meta)
    return out / KOHYA_FILE


def export_fused(final: Path, cfg, base: str, out: Path) -> Path:
    """The base UNet with the LoRA merged in, saved as a diffusers UNet folder `out/unet` (+ `out/scheduler`).

    Only the UNet is written (the LoRA touches nothing else): load it with
    `UNet2DConditionModel.from_pretrained(out, subfolder="unet")` and pass it to the base pipeline.
    """
    unet = base_unet_with_run_lora(final, base, config_dir=cfg.model.get("config_dir"))
    unet.fuse_lora(lora_scale=1.0)  # W ← W + (alpha / r) · B A, in fp32
    unet.unload_lora()  # drop the now-redundant adapter layers: a plain UNet2DConditionModel remains
    unet.save_pretrained(str(out / FUSED_DIR), safe_serialization=True)
    if (final / "scheduler").is_dir():
        shutil.copytree(final / "scheduler", out / "scheduler", dirs_exist_ok=True)
    return out / FUSED_DIR


EXPORT_FORMATS = {"diffusers": export_diffusers, "kohya": export_kohya, "fused": export_fused}


def export_run(run, fmt: str, out=None, base: Optional[str] = None) -> Path:
    """`lcm export`: write RUN's final LoRA as `fmt` into `out` (default RUN/export/FMT); returns the written path."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {sorted(EXPORT_FORMATS)}")
    final, cfg = read_run(run)
    out = Path(out) if out else Path(run) / "export" / fmt
    with write_guard(out):
        return EXPORT_FORMATS[fmt](final, cfg, str(base or cfg.model.pretrained), out)
