#!/usr/bin/env python
"""Full latent consistency distillation: the whole UNet learns few-step sampling (LCM, Luo et al. 2023, arXiv:2310.04378).

Three roles (DESIGN.md §1):
    teacher = the frozen UNet in the weight dtype, queried with CFG at w ~ U[w_min, w_max] (one batched cond+uncond call);
    student = a trainable fp32 copy with a guidance-embedding input (time_cond_proj_dim), its projection zero-initialised
              so the student starts equal to the teacher; w reaches it through that embedding, not through CFG;
    target  = θ⁻, an EMA of the student (ema_decay, default 0.95), evaluated with θ⁻ swapped into the student's module.
PixArt (PixArt-δ): the transformer has no guidance-embedding input, so the student is a plain copy; set w_min = w_max
for a fixed w (as PixArt-δ), or give a range to average over it.
Output: final/unet (diffusers format; the stock pipeline embeds guidance_scale − 1 = w) or final/transformer,
final/scheduler, final/README.md.
Run:  python train_lcd.py --config lcd_sdxl model.pretrained=PATH data.path=FOLDER
"""

from __future__ import annotations

import sys

from lcm import cpu_lowp
from lcm.config import LCDConfig
from lcm.ema import EMATarget
from lcm.export import export_unet_run
from lcm.models import denoiser_name, student_from_teacher
from lcm.objective_task import build_objective
from lcm.roles import denoiser_role, target_role
from lcm.entry import apply_speed_options, parse_train_args, prepare_run, run_task, validation_grid
from lcm.errors import exit_on_user_error
from lcm.trainer import TrainingTask


def main(argv=None):
    run = prepare_run(parse_train_args(argv, __doc__, default_config="lcd_sdxl"), LCDConfig)
    if run is None:  # --dry-run
        return 0
    cfg, accelerator, dataset, pipe, spec = run.cfg, run.accelerator, run.dataset, run.pipe, run.spec

    name = denoiser_name(pipe)  # "unet", or "transformer" for PixArt
    teacher_net = getattr(pipe, name)  # frozen, weight dtype
    # A normal-CFG student (distill.teacher_cfg=false) gets no w input: it is sampled with real CFG instead.
    student = student_from_teacher(teacher_net, cfg.distill.w_embed_dim if cfg.distill.teacher_cfg else None)
    apply_speed_options(student, cfg.train)
    cpu_lowp.apply(teacher_net, cfg.train)  # after the copy: the student has its own
    params = [p for p in student.parameters() if p.requires_grad]
    ema = EMATarget(dict(student.named_parameters()), cfg.distill.ema_decay,
                    device="cpu" if cfg.distill.ema_on_cpu else None)
    teacher, target = denoiser_role(teacher_net), target_role(ema, student)

    # The student goes through the accelerate-prepared module (gradient sync); w enters via its embedding.
    # distill.objective picks the loss; an adversarial one adds a discriminator on the frozen teacher's encoder.
    objective = build_objective(cfg, pipe, spec, accelerator.device, denoiser_role, target, teacher,
                                backbone=teacher_net)

    def final_model():
        """The exported model is the EMA target θ⁻ (consistency models sample from the EMA weights)."""
        ema.copy_to(student.parameters())
        return student

    def validate(step, out_dir):
        with ema.swapped_in():  # validate what will be exported: θ⁻
            validation_grid(run, {name: student}, step, out_dir)

    task = TrainingTask(
        model=student, params=params, dataset=dataset, collate_fn=run.collate_fn, loss_fn=objective.loss_fn,
        critics=objective.critics, before_step=objective.before_step, lr_segments=objective.lr_segments,
        after_optimizer_step=ema.update, extra_state=ema.state, load_extra_state=ema.load,
        validate=validate,
        export=lambda final: export_unet_run(final_model(), pipe.scheduler.config, cfg, final, cfg.train.max_train_steps,
                                             run.summary, subfolder=name))
    return run_task(run, task)


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))  # a user error: one line, exit status 2
