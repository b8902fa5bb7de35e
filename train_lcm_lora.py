#!/usr/bin/env python
"""LCM-LoRA: distil a diffusion teacher into few-step LoRA adapters (Luo et al. 2023, arXiv:2311.05556).

One denoiser (the UNet, or PixArt's transformer) in memory plays three roles (DESIGN.md §1):
    teacher = the denoiser with adapters disabled (frozen base), queried with CFG at w ~ U[w_min, w_max];
    student = the denoiser with adapters on (trainable, fp32 LoRA tensors);
    target  = the denoiser with adapters on, under no_grad, carrying the online weights (ema_decay = 0, as LCM-LoRA
              does) or an adapter-only EMA of them.
Run:  python train_lcm_lora.py --config lcm_lora_sdxl model.pretrained=PATH data.path=FOLDER
      accelerate launch train_lcm_lora.py --config …           (several GPUs / nodes)
"""

from __future__ import annotations

import sys

from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lcm.config import LCMLoraConfig
from lcm import fused_lora
from lcm.entry import apply_speed_options, parse_train_args, prepare_run, run_task, validation_grid
from lcm.errors import exit_on_user_error
from lcm.export import export_lora_run
from lcm.lora import add_lora, load_lora_into_training_unet
from lcm.ema import EMATarget
from lcm.models import denoiser_of
from lcm.objective_task import build_objective
from lcm.roles import base_role, denoiser_role, target_role
from lcm.trainer import TrainingTask

ADAPTER_FILE = "lora_adapter.safetensors"


def build_task(run) -> TrainingTask:
    """The three roles on one denoiser with adapters, as a TrainingTask (benchmarks/train_speed.py times its loss_fn)."""
    cfg, accelerator, pipe, spec = run.cfg, run.accelerator, run.pipe, run.spec

    net = denoiser_of(pipe)  # the UNet, or PixArt's transformer
    params = add_lora(net, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout)
    if cfg.lora.fused_forward:
        fused_lora.install(net, lowp=cfg.lora.fused_lowp)  # before apply_speed_options: torch.compile then traces the fused layers
    apply_speed_options(net, cfg.train)
    named = {n: p for n, p in net.named_parameters() if p.requires_grad}
    ema = EMATarget(named, cfg.distill.ema_decay) if cfg.distill.ema_decay > 0 else None
    teacher = base_role(net)  # frozen base: adapters disabled
    target = target_role(ema, net) if ema else denoiser_role(net)  # lcd_loss evaluates it under no_grad

    # The student goes through the accelerate-prepared module (gradient sync under DDP); teacher/target unwrapped.
    # distill.objective picks the loss (lcd, lcd_adv, add) and, for the adversarial ones, the discriminator critic,
    # whose frozen backbone is this same network with its adapters off.
    objective = build_objective(cfg, pipe, spec, accelerator.device, denoiser_role, target, teacher, backbone=net)

    def save_hook(models, weights, out_dir):
        # Checkpoint the adapters only: the frozen base is the teacher's and never changes. The student is model 0;
        # a discriminator's heads (model 1) stay in accelerate's own files.
        adapters = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))  # on every rank (collective under FSDP)
        if accelerator.is_main_process:  # the same tensors on every rank: one writer
            save_file(adapters, f"{out_dir}/{ADAPTER_FILE}")
        weights.pop(0)

    def load_hook(models, in_dir):
        path = f"{in_dir}/{ADAPTER_FILE}"
        load_lora_into_training_unet(accelerator.unwrap_model(models.pop(0)), load_file(path), source=path)

    return TrainingTask(
        model=net, params=params, dataset=run.dataset, collate_fn=run.collate_fn, loss_fn=objective.loss_fn,
        critics=objective.critics, before_step=objective.before_step, lr_segments=objective.lr_segments,
        after_optimizer_step=ema.update if ema else (lambda: None),
        extra_state=ema.state if ema else dict, load_extra_state=ema.load if ema else (lambda state: None),
        save_model_hook=save_hook, load_model_hook=load_hook,
        validate=lambda step, out_dir: validation_grid(run, {}, step, out_dir),
        export=lambda final: export_lora_run(net, type(pipe), pipe.scheduler.config, cfg, final,
                                             cfg.train.max_train_steps, run.summary))


def main(argv=None):
    run = prepare_run(parse_train_args(argv, __doc__, default_config="lcm_lora_sdxl"), LCMLoraConfig)
    if run is None:  # --dry-run
        return 0
    return run_task(run, build_task(run))


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))  # a user error: one line, exit status 2
