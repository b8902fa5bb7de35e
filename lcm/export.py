"""Final artefacts of a run: diffusers-format LoRA, the LCMScheduler config, and a model card."""

from __future__ import annotations

from pathlib import Path

from .guidance import guidance_scale_from_w
from .lora import save_lora
from .sampling import lcm_scheduler_for


def export_lora_run(unet, pipeline_cls, teacher_scheduler_config, cfg, final_dir: Path, steps_trained: int,
                    data_summary: str = "") -> Path:
    """Write `final/` so `pipe.load_lora_weights(final)` and `LCMScheduler.from_pretrained(final/'scheduler')` work."""
    final_dir = Path(final_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    save_lora(unet, final_dir, pipeline_cls)
    scheduler = lcm_scheduler_for(teacher_scheduler_config, cfg.distill.num_ddim_timesteps, cfg.distill.timestep_scaling)
    scheduler.save_pretrained(str(final_dir / "scheduler"))
    (final_dir / "README.md").write_text(model_card(cfg, steps_trained, data_summary))
    return final_dir


def model_card(cfg, steps_trained: int, data_summary: str = "") -> str:
    """A short model card: base, data, training, and how to sample."""
    d = cfg.distill
    return f"""---
library_name: diffusers
base_model: {cfg.model.pretrained}
tags: [lcm, lcm-lora, latent-consistency-distillation, {cfg.model.kind}]
---
# LCM-LoRA for `{cfg.model.pretrained}`

Distilled with [lcm-distill](https://pypi.org/project/lcm-distill/) by latent consistency distillation.

| | |
|---|---|
| base model | `{cfg.model.pretrained}` ({cfg.model.kind}) |
| data | `{cfg.data.path}` ({cfg.data.source}, {cfg.data.resolution} px){' — ' + data_summary if data_summary else ''} |
| optimiser steps | {steps_trained} × batch {cfg.train.batch_size} × accumulation {cfg.train.gradient_accumulation_steps} |
| LoRA | rank {cfg.lora.rank}, alpha {cfg.lora.alpha} |
| teacher grid | N = {d.num_ddim_timesteps} ({d.solver}), guidance w ∈ [{d.w_min}, {d.w_max}] (LCM convention; diffusers guidance_scale = w + 1 ∈ [{guidance_scale_from_w(d.w_min)}, {guidance_scale_from_w(d.w_max)}]) |
| loss | {d.loss}{f' (c = {d.huber_c})' if d.loss == 'huber' else ''}, EMA decay {d.ema_decay} |

**Recommended sampling:** 4 steps (2–8 work), `guidance_scale` 1.0–2.0 with `LCMScheduler`
(the guidance was distilled in; values above 2 over-saturate, and ≤ 1 makes negative prompts inert).

```python
from diffusers import DiffusionPipeline, LCMScheduler
pipe = DiffusionPipeline.from_pretrained("{cfg.model.pretrained}")
pipe.load_lora_weights("path/to/this/folder")
pipe.scheduler = LCMScheduler.from_pretrained("path/to/this/folder", subfolder="scheduler")
image = pipe("a prompt", num_inference_steps=4, guidance_scale=1.0).images[0]
```
"""
