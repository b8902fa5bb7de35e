#!/usr/bin/env python
"""LCM-LoRA: distil a diffusion teacher into few-step LoRA adapters (Luo et al. 2023, arXiv:2311.05556).

One UNet in memory plays three roles (DESIGN.md §1):
    teacher = the UNet with adapters disabled (frozen base), queried with CFG at w ~ U[w_min, w_max];
    student = the UNet with adapters on (trainable, fp32 LoRA tensors);
    target  = the UNet with adapters on, under no_grad, carrying the online weights (ema_decay = 0, as LCM-LoRA does)
              or an adapter-only EMA of them.
Run:  python train_lcm_lora.py --config lcm_lora_sdxl model.pretrained=PATH data.path=FOLDER
      accelerate launch train_lcm_lora.py --config …           (several GPUs / nodes)
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from lcm.config import load_config, to_yaml
from lcm.consistency import LCDBatch, LCDSpec, lcd_loss
from lcm.data import add_time_ids, build_dataset, collate_fn, format_summary
from lcm.ema import ema_update_
from lcm.encode import encode_images, encode_text
from lcm.export import export_lora_run
from lcm.guidance import sample_w
from lcm.lora import add_lora, load_lora_into_training_unet, swapped_weights
from lcm.models import base_role, load_pipeline, noise_schedule_of, pipeline_class_of, unet_role, weight_dtype_for
from lcm.sampling import generate, image_grid, lcm_scheduler_for
from lcm.schedule import SolverGrid
from lcm.trainer import TrainingTask, make_accelerator, train

from peft.utils import get_peft_model_state_dict

ADAPTER_FILE = "lora_adapter.safetensors"


class AdapterEMA:
    """θ⁻ for the LoRA tensors only: cheap, since the frozen base is shared by all three roles."""

    def __init__(self, named_params: dict, decay: float):
        self.names, self.params, self.decay = list(named_params), list(named_params.values()), decay
        self.shadow = [p.detach().clone() for p in self.params]

    def state(self) -> dict:
        """EMA tensors keyed by parameter name, so a checkpoint never depends on parameter order."""
        return {f"ema.{n}": t for n, t in zip(self.names, self.shadow)}

    def load(self, state: dict) -> None:
        for n, t in zip(self.names, self.shadow):
            t.copy_(state[f"ema.{n}"])

    def update(self):
        ema_update_(self.shadow, self.params, self.decay)

    def role(self, unet):
        inner = unet_role(unet)

        def call(z, t, cond, w=None):
            with swapped_weights(self.params, self.shadow):
                return inner(z, t, cond, w)

        return call


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="lcm_lora_sdxl", help="a YAML file or the name of a preset in configs/")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (same as train.resume=…)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_train_steps=100 lora.rank=16")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    accelerator = make_accelerator(cfg.train)
    device = accelerator.device
    # Important: seed everything that draws from the global RNGs (the LoRA init below). torch's default generator
    # starts from a random seed in every process, so without this two runs with the same train.seed differ.
    set_seed(cfg.train.seed)

    # Data first: an empty or unusable folder fails here, before any model is loaded.
    dataset = build_dataset(cfg.data, seed=cfg.train.seed)
    summary = format_summary(dataset.summary)
    accelerator.print(summary)
    if len(dataset) < cfg.train.batch_size:
        raise ValueError(f"only {len(dataset)} usable image(s), fewer than train.batch_size={cfg.train.batch_size} "
                         f"({summary})")

    pipe = load_pipeline(cfg.model.kind, cfg.model.pretrained, weight_dtype_for(cfg.train.mixed_precision),
                         cfg.model.revision, cfg.model.variant)
    pipe.to(device)
    unet = pipe.unet
    params = add_lora(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    teacher_scheduler_config = pipe.scheduler.config
    spec = LCDSpec(noise_schedule_of(pipe.scheduler), SolverGrid(teacher_scheduler_config.num_train_timesteps,
                   cfg.distill.num_ddim_timesteps), teacher_scheduler_config.prediction_type, cfg.distill.solver,
                   cfg.distill.loss, cfg.distill.huber_c, cfg.distill.sigma_data, cfg.distill.timestep_scaling)
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    ema = AdapterEMA(named, cfg.distill.ema_decay) if cfg.distill.ema_decay > 0 else None
    teacher = base_role(unet)  # frozen base: adapters disabled
    target = ema.role(unet) if ema else unet_role(unet)  # lcd_loss evaluates it under no_grad

    def loss_fn(model, batch, gen):
        # 1. Clean latents and text conditioning (fp32 VAE; SDXL micro-conditioning in (h, w) order).
        z0 = encode_images(pipe.vae, batch["pixel_values"], gen)
        time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        cond, uncond = encode_text(pipe, batch["caption"], time_ids, device)
        # 2. Everything random is drawn here, from this step's generator: noise, grid index n, guidance w.
        B = z0.shape[0]
        lcd = LCDBatch(z0=z0, noise=torch.randn(z0.shape, generator=gen, device=device),
                       index=spec.grid.sample_index(B, gen, device),
                       w=sample_w(B, cfg.distill.w_min, cfg.distill.w_max, gen, device), cond=cond, uncond=uncond)
        # 3. Student through the accelerate-prepared module (gradient sync under DDP); teacher/target unwrapped.
        return lcd_loss(unet_role(model), target, teacher, lcd, spec)

    def save_hook(models, weights, out_dir):
        # Checkpoint the adapters only: the frozen base is the teacher's and never changes.
        save_file(get_peft_model_state_dict(accelerator.unwrap_model(models[0])), f"{out_dir}/{ADAPTER_FILE}")
        weights.pop()

    def load_hook(models, in_dir):
        load_lora_into_training_unet(accelerator.unwrap_model(models.pop()), load_file(f"{in_dir}/{ADAPTER_FILE}"))

    def validate(step, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        val = type(pipe)(**{**pipe.components, "scheduler": lcm_scheduler_for(
            teacher_scheduler_config, cfg.distill.num_ddim_timesteps, cfg.distill.timestep_scaling)})
        val.set_progress_bar_config(disable=True)
        v = cfg.validation
        images = generate(val, list(v.prompts), list(v.seeds), v.num_inference_steps, v.guidance_scale,
                          cfg.data.resolution, cfg.data.resolution)
        image_grid(images, len(v.seeds)).save(out_dir / f"step-{step:06d}.png")

    task = TrainingTask(
        model=unet, params=params, dataset=dataset, collate_fn=collate_fn, loss_fn=loss_fn,
        after_optimizer_step=ema.update if ema else (lambda: None),
        extra_state=ema.state if ema else dict, load_extra_state=ema.load if ema else (lambda state: None),
        save_model_hook=save_hook, load_model_hook=load_hook, validate=validate,
        export=lambda final: export_lora_run(unet, pipeline_class_of(pipe), teacher_scheduler_config, cfg, final,
                                             cfg.train.max_train_steps, summary))
    train(cfg, accelerator, task)
    if dataset.summary.n_decode_errors:  # files that passed the header check but failed to decode during training
        accelerator.print(format_summary(dataset.summary))
    accelerator.print(f"done: {cfg.train.output_dir}/final")
    return 0


if __name__ == "__main__":
    sys.exit(main())
