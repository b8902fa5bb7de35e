"""The shared training loop: accelerate engine, optimiser, LR schedule, accumulation, clipping, checkpoints, logging.

Entry scripts (`train_lcm_lora.py`, later `train_lcd.py`) describe *what* to train as a `TrainingTask`; this module
decides *how*. Checkpoints are written to a temporary folder and renamed, so a crash mid-write never leaves a broken
latest checkpoint.

Resuming is exact (tests/test_resume.py kills a run and compares bits): every random draw comes from a seed in
lcm/seeds.py (the shuffle order, crops/flips, each sample's VAE noise/ε/grid index/w, LoRA dropout; its docstring
states the contract), and optimiser, LR schedule, EMA and accumulation counters are restored from the checkpoint.
A streamed dataset (lcm/data/stream.py) resumes by replaying its epoch's stream, which depends on (seed, epoch) only, and
dropping the batches already consumed before decoding them.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .checkpoints import last_good_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from .config import to_yaml
from .data import StreamEpoch, build_loader
from .errors import DataError, write_guard
from .seeds import sample_generators, sample_position, seed_global_rng_for_step, step_generator

logger = logging.getLogger("lcm")


@dataclass
class Critic:
    """A second trainable module (a discriminator), stepped after the student on the same micro-batch with its own
    optimiser, LR schedule, gradient clipping, checkpoint state and DDP wrapping. `loss_fn(model, handoff,
    generators)` returns (per-sample loss, diagnostics); `handoff` is what the student's loss returned third (its
    real and generated samples, detached), `generators` the micro-batch's per-sample generators, continued."""

    name: str
    model: torch.nn.Module
    params: list
    loss_fn: Callable
    optim: Any  # an OptimConfig: lr, betas, schedule, warm-up and max_grad_norm of this module alone
    steps_per_generator_step: int = 1


@dataclass
class TrainingTask:
    """What an entry script hands the loop. `loss_fn(model, batch, generators)` returns (per-sample loss, diagnostics)
    or (per-sample loss, diagnostics, handoff) when critics follow; `generators` holds one per sample of the
    micro-batch (`seeds.sample_generators`). Order within a step: the student's loss, backward and optimiser step,
    then each critic in list order (a critic with `steps_per_generator_step` n takes n steps), then
    `after_optimizer_step` (the EMA)."""

    model: torch.nn.Module  # holds the trainable parameters; prepared (DDP-wrapped) by accelerate
    params: list  # the trainable parameters (LoRA tensors or the whole student)
    dataset: torch.utils.data.Dataset
    collate_fn: Callable
    loss_fn: Callable
    after_optimizer_step: Callable[[], None] = lambda: None  # e.g. the EMA update of the target
    extra_state: Callable[[], dict] = dict  # tensors to checkpoint beside accelerate's state (EMA weights)
    load_extra_state: Callable[[dict], None] = lambda state: None
    save_model_hook: Optional[Callable] = None  # accelerate save/load pre-hooks (LoRA: adapters only)
    load_model_hook: Optional[Callable] = None
    validate: Callable[[int, Path], None] = lambda step, out_dir: None
    export: Callable[[Path], None] = lambda final_dir: None
    summary: dict = field(default_factory=dict)
    critics: list = field(default_factory=list)  # Critic modules stepped after the student, in this order
    before_step: Callable[[int], None] = lambda step: None  # told the completed-step count before each micro-batch
    lr_segments: Optional[list] = None  # the student's LR schedule restarts after each (Lightning's stages); None = one

    def all_params(self) -> list:
        """Every trainable tensor: the student's, then each critic's."""
        return [*self.params, *(p for c in self.critics for p in c.params)]


DETERMINISTIC_ENV = "LCM_DETERMINISTIC"  # "1": torch.use_deterministic_algorithms(True) for bit-exact reruns on GPU


def make_accelerator(train_cfg) -> Accelerator:
    """accelerate does devices, mixed precision, accumulation, distribution and the tracker."""
    out = Path(train_cfg.output_dir)
    return Accelerator(
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        log_with=None if train_cfg.report_to == "none" else train_cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Seedable sampler: the shuffle order of epoch e depends only on (seed, e), so resuming replays it exactly.
        # Important: pass data_seed. Without it accelerate seeds the sampler from torch.random.initial_seed(), which
        # load_state's RNG restore changes, so a resumed run shuffled differently (and train.seed was ignored).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_cfg.seed),
    )


def build_optimizer(params, optim_cfg):
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for (it must be installed: `pip install lcm-distill[bnb]`)."""
    kwargs = dict(lr=optim_cfg.lr, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
                  weight_decay=optim_cfg.weight_decay, eps=optim_cfg.adam_epsilon)
    if optim_cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("optim.use_8bit_adam=true needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_lr_scheduler(optimizer, optim_cfg, max_train_steps: int, num_processes: int,
                       segments: Optional[Sequence[int]] = None):
    """A diffusers LR schedule with warm-up; steps count scheduler calls, which accelerate makes per process.

    `segments` (optimiser steps, summing to `max_train_steps`) restarts the schedule at each boundary: segment i runs
    the same diffusers schedule, warm-up included, as if it were a run of its own `segments[i]` steps."""
    from diffusers.optimization import get_scheduler

    def schedule(opt, steps):
        return get_scheduler(optim_cfg.lr_scheduler, optimizer=opt,
                             num_warmup_steps=optim_cfg.lr_warmup_steps * num_processes,
                             num_training_steps=steps * num_processes)

    if segments is None:
        return schedule(optimizer, max_train_steps)
    segments = list(segments)
    if sum(segments) != max_train_steps or any(n < 1 for n in segments):
        raise ValueError(f"LR segments {segments} must be positive and sum to {max_train_steps} steps")
    factors, starts, start = [], [], 0
    for n in segments:
        # The factor of each segment's own schedule, read from one built on a throwaway optimiser.
        probe = schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), n)
        if not isinstance(probe, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(f"optim.lr_scheduler={optim_cfg.lr_scheduler!r} cannot restart per stage (not a "
                             "step-indexed schedule); use constant, linear, cosine or another LambdaLR schedule")
        factors.append(probe.lr_lambdas[0])
        starts.append(start * num_processes)
        start += n

    def factor(step: int) -> float:
        i = bisect.bisect_right(starts, step) - 1
        return factors[i](step - starts[i])

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_and_step(accelerator: Accelerator, params, optimizer, lr_scheduler, max_grad_norm: float):
    """Clip the *trainable* gradients (the ones the optimiser will use), then step; returns the pre-clip norm or None."""
    grad_norm = None
    if accelerator.sync_gradients and max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# --- the loop --------------------------------------------------------------------------------------------------------


def _flat_hparams(cfg) -> dict:
    """Tracker-friendly hyper-parameters: scalars stay, lists become strings."""
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            else:
                flat[key] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return flat


@dataclass
class _Run:
    """What `train` prepares once and its helpers share: the accelerate-prepared model, optimiser, LR schedule and
    loader, each critic's prepared (model, optimiser, LR schedule), and the optimiser-step counter (the one piece of
    loop state a checkpoint restores; critics step with the student, so one counter serves all)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: torch.utils.data.DataLoader
    bucket_sampler: Optional[torch.utils.data.Sampler]  # ours, when data.buckets: accelerate cannot set its epoch
    stream: bool  # the loader is this rank's stream of whole batches (StreamEpoch), not a map-style loader
    steps_per_epoch: int
    step: int = 0  # completed optimiser steps
    critics: list = field(default_factory=list)  # _CriticRun, in the task's critic order


@dataclass
class _CriticRun:
    critic: Critic
    model: torch.nn.Module  # prepared (DDP-wrapped on several ranks)
    optimizer: torch.optim.Optimizer
    lr_scheduler: object


@dataclass
class _MicroStep:
    """One micro-batch's outcome; the last one of an accumulation window is what the step logs."""

    loss: torch.Tensor
    grad_norm: Optional[torch.Tensor]
    diagnostics: dict


def train(cfg, accelerator: Accelerator, task: TrainingTask) -> int:
    """Run optimiser steps until `train.max_train_steps`; checkpoint, validate and export along the way."""
    tc = cfg.train
    _prepare_run_folder(cfg, accelerator, task)
    run = _prepare(cfg, accelerator, task)
    progress = tqdm(total=tc.max_train_steps, initial=run.step, desc="lcm", disable=not accelerator.is_main_process)
    run.model.train()
    while run.step < tc.max_train_steps:
        for micro, batch in enumerate(_epoch_batches(cfg, accelerator, task, run)):
            result = _micro_step(cfg, accelerator, task, run, micro, batch)
            if not accelerator.sync_gradients:
                continue  # inside an accumulation window: no optimiser step yet
            run.step += 1
            task.after_optimizer_step()
            _end_of_step(cfg, accelerator, task, run, result, progress)
            if run.step >= tc.max_train_steps:
                break
    progress.close()
    _finish(cfg, accelerator, task)
    return run.step


def _prepare_run_folder(cfg, accelerator: Accelerator, task: TrainingTask) -> None:
    """Determinism switch, the resolved config.yaml in the run folder, and the task's checkpoint hooks."""
    out = Path(cfg.train.output_dir)
    if os.environ.get(DETERMINISTIC_ENV, "") == "1":
        # CPU kernels here are already deterministic at a fixed thread count; CUDA ones (atomics in backward, cuBLAS
        # workspaces) are not, and raise instead of silently differing once this is on.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if accelerator.is_main_process:
        with write_guard(out / "config.yaml"):
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(to_yaml(cfg))
    if task.save_model_hook:
        accelerator.register_save_state_pre_hook(task.save_model_hook)
    if task.load_model_hook:
        accelerator.register_load_state_pre_hook(task.load_model_hook)


def _prepare(cfg, accelerator: Accelerator, task: TrainingTask) -> _Run:
    """Loader, optimiser and LR schedule through accelerate, then the checkpoint to resume from and the trackers."""
    tc = cfg.train
    loader, bucket_sampler = build_loader(task.dataset, task.collate_fn, tc.batch_size, tc.seed, cfg.data.num_workers,
                                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                                          accumulation=tc.gradient_accumulation_steps)
    if len(loader) == 0:
        raise DataError(f"dataset has {len(task.dataset)} usable samples, fewer than train.batch_size={tc.batch_size}")
    optimizer = build_optimizer(task.params, cfg.optim)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, tc.max_train_steps, accelerator.num_processes,
                                      task.lr_segments)
    critic_parts = _critic_parts(task, tc, accelerator.num_processes)
    # Important: a stream's loader is already this rank's (disjoint shards). accelerate.prepare would shard an iterable
    # by reading the whole stream on every rank, so it is wrapped as a one-process loader: accelerate then only moves
    # its batches to the device and marks the epoch's end for gradient accumulation.
    stream = isinstance(loader.dataset, StreamEpoch)
    if stream:
        loader = prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0,
                                     dispatch_batches=False)
        model, optimizer, lr_scheduler, *critic_parts = accelerator.prepare(task.model, optimizer, lr_scheduler,
                                                                             *critic_parts)
    else:
        model, optimizer, loader, lr_scheduler, *critic_parts = accelerator.prepare(task.model, optimizer, loader,
                                                                                     lr_scheduler, *critic_parts)
    critics = [_CriticRun(c, *critic_parts[3 * i: 3 * i + 3]) for i, c in enumerate(task.critics)]

    global_step = 0
    resume_from = resolve_resume(tc.output_dir, tc.resume)
    if resume_from is not None:
        global_step = load_checkpoint(accelerator, task, resume_from)
        logger.info("resumed from %s at step %d", resume_from, global_step)
    if tc.report_to != "none":
        accelerator.init_trackers("lcm", config=_flat_hparams(cfg))

    accumulation, world = tc.gradient_accumulation_steps, accelerator.num_processes
    accelerator.print(f"{world} process(es) × batch {tc.batch_size} × accumulation {accumulation} = global batch "
                      f"{world * tc.batch_size * accumulation}")
    # Important: accelerate also steps on an epoch's last, partial accumulation window (it syncs at the end of the
    # dataloader), so an epoch is ceil(batches / accumulation) optimiser steps. Resume maps step → (epoch, batch) with
    # this number; the floor would resume into the wrong epoch whenever the two differ.
    return _Run(model, optimizer, lr_scheduler, loader, bucket_sampler, stream,
                steps_per_epoch=math.ceil(len(loader) / accumulation), step=global_step, critics=critics)


def _critic_parts(task: TrainingTask, tc, num_processes: int) -> list:
    """(model, optimiser, LR schedule) of every critic, flat, in order, for one `accelerator.prepare` call: the
    prepared order is the checkpoint order (the student is model 0, critic i is model i + 1)."""
    parts = []
    for critic in task.critics:
        if critic.steps_per_generator_step > 1 and tc.gradient_accumulation_steps > 1:
            raise ValueError(f"critic {critic.name!r}: steps_per_generator_step > 1 needs "
                             "train.gradient_accumulation_steps=1 (each extra step would need a window of its own)")
        opt = build_optimizer(critic.params, critic.optim)
        parts += [critic.model, opt, build_lr_scheduler(opt, critic.optim, tc.max_train_steps, num_processes)]
    return parts


def _epoch_batches(cfg, accelerator: Accelerator, task: TrainingTask, run: _Run):
    """The batches left in the epoch `run.step` falls in, map-style or streamed alike: every epoch-dependent draw is
    set to this epoch, and the batches a resumed run already consumed this epoch are skipped."""
    accumulation = cfg.train.gradient_accumulation_steps
    epoch = run.step // run.steps_per_epoch
    if run.bucket_sampler is not None:  # accelerate cannot reach it through its multi-process shard wrapper
        run.bucket_sampler.set_epoch(epoch)
    if hasattr(task.dataset, "set_epoch"):
        task.dataset.set_epoch(epoch)  # per-item crop/flip randomness depends on (seed, epoch, index)
    skip = (run.step % run.steps_per_epoch) * accumulation
    if run.stream:  # the stream replays the epoch and drops the first `skip` batches before decoding them
        run.loader.dataset.skip = skip
        return run.loader
    run.loader.set_epoch(epoch)
    return accelerator.skip_first_batches(run.loader, skip) if skip else run.loader


def _micro_step(cfg, accelerator: Accelerator, task: TrainingTask, run: _Run, micro: int, batch) -> _MicroStep:
    """Loss and backward of one micro-batch; on the last of an accumulation window, clip and step the optimiser.

    Its random draws are keyed by (seed, step, micro-batch, rank) and by each sample's stream position (lcm/seeds.py),
    which is what makes resuming and the number of ranks invisible in the result.
    """
    tc = cfg.train
    rank, world, accumulation = accelerator.process_index, accelerator.num_processes, tc.gradient_accumulation_steps
    with accelerator.accumulate(run.model, *(c.model for c in run.critics)):
        m = micro % accumulation
        seed_global_rng_for_step(step_generator(tc.seed, rank, world, run.step, m, accelerator.device))
        first = sample_position(run.step, m, rank, world, accumulation, tc.batch_size)
        gens = sample_generators(tc.seed, first, tc.batch_size)
        task.before_step(run.step)
        with accelerator.autocast():
            per_sample, diagnostics, *handoff = task.loss_fn(run.model, batch, gens)
        loss = per_sample.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} in step {run.step + 1} (after {run.step} completed steps); "
                f"stopping. Last good checkpoint: {last_good_checkpoint(tc.output_dir)}"
                " — lower optim.lr or try train.mixed_precision=no, then resume from it.")
        accelerator.backward(loss)
        grad_norm = clip_and_step(accelerator, task.params, run.optimizer, run.lr_scheduler, cfg.optim.max_grad_norm)
        for critic in run.critics:
            diagnostics = {**diagnostics, **_critic_step(accelerator, critic, handoff[0] if handoff else None, gens)}
    return _MicroStep(loss, grad_norm, diagnostics)


def _critic_step(accelerator: Accelerator, run: _CriticRun, handoff, gens) -> dict:
    """The critic's loss on the student's handoff, backward and (at the end of a window) its optimiser step, repeated
    `steps_per_generator_step` times; its diagnostics, prefixed with its name unless already prefixed."""
    c = run.critic
    for _ in range(c.steps_per_generator_step):
        with accelerator.autocast():
            per_sample, diagnostics = c.loss_fn(run.model, handoff, gens)
        loss = per_sample.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{c.name} loss is {loss.item()}; stopping — lower its lr or raise R1's gamma")
        accelerator.backward(loss)
        grad_norm = clip_and_step(accelerator, c.params, run.optimizer, run.lr_scheduler, c.optim.max_grad_norm)
    out = {k if k.startswith(c.name) else f"{c.name}_{k}": v for k, v in diagnostics.items()}
    out[f"{c.name}_lr"] = run.lr_scheduler.get_last_lr()[0]
    if grad_norm is not None:
        out[f"{c.name}_grad_norm"] = grad_norm
    return out


METRICS_FILE = "metrics.jsonl"


def append_metrics(path: Path, step: int, logs: dict) -> None:
    """One JSON line {"step", "loss", "lr", …, D loss and accuracy for an adversarial run} per logged step, whatever
    train.report_to says: a run without tensorboard (every benchmark) keeps its scalars. A resumed run appends, so a
    step logged before a crash and again after the resume appears twice; the later line is the one that continued."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **logs}) + "\n")


def _end_of_step(cfg, accelerator: Accelerator, task: TrainingTask, run: _Run, result: _MicroStep, progress) -> None:
    """After optimiser step `run.step`: progress bar, tracker logs, checkpoint and validation when they are due."""
    tc, step = cfg.train, run.step
    progress.update(1)
    logs = {"loss": result.loss.detach().item(), "lr": run.lr_scheduler.get_last_lr()[0]}
    if result.grad_norm is not None:
        logs["grad_norm"] = float(result.grad_norm)
    logs.update({k: float(v) for k, v in result.diagnostics.items()})
    progress.set_postfix(loss=f"{logs['loss']:.4g}")
    if step % tc.log_every == 0 or step == tc.max_train_steps:
        accelerator.log(logs, step=step)
        if accelerator.is_main_process:
            append_metrics(Path(tc.output_dir) / METRICS_FILE, step, logs)
    if tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0:
        save_checkpoint(accelerator, task, cfg, step)
    every = cfg.validation.every_n_steps
    if accelerator.is_main_process and every > 0 and step % every == 0:
        task.validate(step, Path(tc.output_dir) / "samples")


def _finish(cfg, accelerator: Accelerator, task: TrainingTask) -> None:
    """Wait for every rank, export the final artefacts from the main one, close the trackers."""
    out = Path(cfg.train.output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with write_guard(out / "final", last_good_checkpoint(out)):  # a full disk: say so, and what survives
            task.export(out / "final")
    accelerator.end_training()
