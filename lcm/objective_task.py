"""From `distill.objective` to what the trainer runs: the student's loss over the roles and, for the adversarial
objectives, the discriminator critic (DESIGN.md §2). Entry scripts build the roles; this module picks the loss.

    lcd      loss_fn = LCD; no critic                                  (bit-identical to before the objectives)
    lcd_adv  loss_fn = LCD + w·L_G(D(f_θ)); critic "d" = the heads on the frozen teacher encoder
    pcm_adv, tcd_adv  loss_fn = pcm / tcd + w·L_G(D(f_θ → clean)) on the student's clean estimate, or with
             adversarial.judge=end on f_θ → s, its output at the row's end point; the same critic
    add      loss_fn = ADD's L_G + λ·distillation; the same critic
    pcm      loss_fn = LCD toward each sample's phase edge (distill.phases); no critic
    tcd      loss_fn = LCD toward a drawn s ∈ [0, t_n] on the trajectory; no critic
    lightning  loss_fn = the current stage's MSE or L_G on the student's flow; critic "d" = the pair discriminator
Step order (lcm/trainer.py): student step (D frozen, judged through), then the D step on the handoff, then the EMA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .adversarial import frozen, warmed_up_weight
from .consistency import LCDSpec, lcd_terms, with_self_generated_z0
from .discriminator import (EncoderDiscriminator, EncoderPairDiscriminator, build_heads, build_pair_heads, encoder_copy,
                            make_discriminator, make_pair_discriminator, teacher_features)
from .encode import lcd_batch_from_data
from .lightning import check_stages, lightning_discriminator_loss, lightning_loss, make_stage, stage_at
from .objectives import (OBJECTIVES, ADDSpec, AdversarialSpec, StudentTimesteps, add_loss, base_objective,
                         discriminator_loss, with_adversarial_term)
from .trainer import Critic
from .trajectory import check_phases, pcm_terms, tcd_terms

CONSISTENCY_OBJECTIVES = ("lcd", "pcm", "tcd")
ADVERSARIAL_OBJECTIVES = tuple(o for o in OBJECTIVES if o not in CONSISTENCY_OBJECTIVES)  # with a discriminator


@dataclass
class ObjectiveParts:
    """The loss the student trains on, the critics that step after it, and the hook that tells the loss the step."""

    loss_fn: Callable
    critics: list = field(default_factory=list)
    before_step: Callable[[int], None] = lambda step: None
    discriminator: torch.nn.Module | None = None  # the critic's module: the heads, or encoder copy + heads
    lr_segments: list | None = None  # the student's LR schedule restarts after each of these step counts


def adversarial_spec(adv_cfg) -> AdversarialSpec:
    return AdversarialSpec(loss=adv_cfg.loss, r1_gamma=adv_cfg.r1_gamma, t_hat_loc=adv_cfg.t_hat_loc,
                           t_hat_scale=adv_cfg.t_hat_scale, t_hat_shift=adv_cfg.t_hat_shift,
                           student_t_max=adv_cfg.student_t_max, judge=adv_cfg.judge)


def add_spec(adv_cfg) -> ADDSpec:
    return ADDSpec(StudentTimesteps(adv_cfg.student_timesteps), distill_weight=adv_cfg.distill_weight,
                   weighting=adv_cfg.distill_weighting)


def build_objective(cfg, pipe, spec: LCDSpec, device, student_of: Callable, target, teacher, backbone) -> ObjectiveParts:
    """`student_of(model)` makes the student role from the accelerate-prepared module; `target`/`teacher` are roles;
    `backbone` is the teacher network the discriminator reads features from (adapters switched off inside)."""
    objective = cfg.distill.objective
    base = base_objective(objective)
    if base in CONSISTENCY_OBJECTIVES:  # the same batch and roles; only the end point s differs
        if base == "pcm":
            check_phases(spec.grid, cfg.distill.phases)
        # each returns (per-sample loss, diagnostics, the student's outputs an adversarial term judges)
        terms = {"lcd": lambda student, b, gens: lcd_terms(student, target, teacher, b, spec),
                 "pcm": lambda student, b, gens: pcm_terms(student, target, teacher, b, spec, cfg.distill.phases),
                 "tcd": lambda student, b, gens: tcd_terms(student, target, teacher, b, spec, gens,
                                                           cfg.distill.tcd_clean_share)}[base]
        if objective == base:
            def consistency_loss(model, batch, gens):
                lcd_batch = lcd_batch_from_data(pipe, batch, gens, cfg.distill, spec.grid, device)
                # the sampler's own inputs for a share of the rows (drawn after the batch; 0 draws nothing)
                lcd_batch = with_self_generated_z0(target, lcd_batch, spec, cfg.distill.self_input_share, gens)
                loss, diagnostics, _ = terms(student_of(model), lcd_batch, gens)
                return loss, diagnostics
            return ObjectiveParts(consistency_loss)
    elif objective not in ADVERSARIAL_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {list(OBJECTIVES)}")

    if objective == "lightning":
        return _lightning_objective(cfg, pipe, spec, device, student_of, teacher, backbone)
    a = cfg.adversarial
    adv = adversarial_spec(a)
    features = teacher_features(backbone)
    heads = build_heads(backbone, a.head_hidden, spec.schedule.T).to(device)
    if a.backbone == "trainable":  # D = its own encoder copy + the heads, trained together (Lightning)
        critic_module = EncoderDiscriminator(encoder_copy(backbone), heads).to(device)
        judge = critic_module
    else:  # D = the teacher's frozen encoder (held by reference) + the heads; only the heads train
        critic_module = heads
        judge = make_discriminator(features, heads)
    step = {"now": 0}

    def weight() -> float:
        return warmed_up_weight(a.weight, a.warmup_steps, step["now"])

    if base in CONSISTENCY_OBJECTIVES:  # lcd_adv, pcm_adv, tcd_adv
        def generator_loss(model, batch, gens):
            lcd_batch = lcd_batch_from_data(pipe, batch, gens, cfg.distill, spec.grid, device)
            with frozen(critic_module):  # the student's step: D is judged through, never updated
                return with_adversarial_term(terms(student_of(model), lcd_batch, gens), judge, lcd_batch, spec, adv,
                                             weight(), gens)
    else:
        add = add_spec(a)

        def generator_loss(model, batch, gens):
            add_batch = lcd_batch_from_data(pipe, batch, gens, cfg.distill, add.student_timesteps, device)
            with frozen(critic_module):
                return add_loss(student_of(model), teacher, judge, add_batch, spec, add, adv, weight(), gens)

    def d_loss(model, handoff, gens):
        if a.backbone == "trainable":  # `model` is the (prepared) EncoderDiscriminator itself
            return discriminator_loss(model, handoff, gens, spec.schedule, adv)
        # The frozen backbone's activations need a graph only for R1 (∇ w.r.t. the real input); otherwise the
        # heads' gradients stop at the features, so they are computed without one.
        feats = features if adv.r1_gamma > 0 else _no_grad(features)
        return discriminator_loss(make_discriminator(feats, model), handoff, gens, spec.schedule, adv)

    critic = Critic("d", critic_module, list(critic_module.parameters()), d_loss, a.optim, a.d_steps_per_g)
    return ObjectiveParts(generator_loss, [critic], lambda n: step.update(now=n), critic_module)


def _lightning_objective(cfg, pipe, spec: LCDSpec, device, student_of, teacher, backbone) -> ObjectiveParts:
    """SDXL-Lightning: the stage of each step from the progressive schedule, its segments drawn per sample, and the
    pair discriminator (frozen teacher encoder + heads, or a trainable encoder copy with them) as critic "d"."""
    d, a = cfg.distill, cfg.adversarial
    stages = list(d.stages)
    per_stage = check_stages(stages, None if d.stage_steps is None else list(d.stage_steps),
                             cfg.train.max_train_steps, d.mse_stages)
    made = [make_stage(i, stages, d.mse_stages, d.x0_one_step, d.teacher_steps, spec.prediction_type,
                       spec.schedule.T, d.mse_weight) for i in range(len(stages))]
    heads = build_pair_heads(backbone, a.head_hidden, spec.schedule.T, a.conditional).to(device)
    features = teacher_features(backbone)
    if a.backbone == "trainable":
        critic_module = EncoderPairDiscriminator(encoder_copy(backbone), heads, a.conditional).to(device)
        judge = critic_module
    else:
        critic_module = heads
        judge = make_pair_discriminator(features, heads, a.conditional)
    step = {"now": 0}

    def generator_loss(model, batch, gens):
        stage = made[stage_at(step["now"], per_stage)]
        lcd_batch = lcd_batch_from_data(pipe, batch, gens, d, stage.grid, device)
        with frozen(critic_module):
            return lightning_loss(student_of(model), teacher, judge, lcd_batch, spec, stage, a.loss,
                                  warmed_up_weight(a.weight, a.warmup_steps, step["now"]))

    def d_loss(model, handoff, gens):
        if a.backbone == "trainable":
            return lightning_discriminator_loss(model, handoff, a.loss, a.r1_gamma)
        feats = features if a.r1_gamma > 0 else _no_grad(features)
        return lightning_discriminator_loss(make_pair_discriminator(feats, model, a.conditional), handoff, a.loss,
                                            a.r1_gamma)

    critic = Critic("d", critic_module, list(critic_module.parameters()), d_loss, a.optim, a.d_steps_per_g)
    return ObjectiveParts(generator_loss, [critic], lambda n: step.update(now=n), critic_module,
                          per_stage if d.stage_lr_restart else None)


def _no_grad(features):
    def call(z, t, cond):
        with torch.no_grad():
            return features(z, t, cond)
    return call
