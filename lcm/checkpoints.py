"""Checkpoints: accelerate's state plus our counters and extra tensors, written to a temporary folder and renamed, so a
crash mid-write never leaves a broken latest checkpoint; old ones are renamed out of the `step-` namespace before they
are deleted, so a crash mid-delete never leaves a half-deleted one under a valid name. A non-finite trainable tensor or
a full disk never becomes the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .config import to_yaml
from .errors import PathNotFoundError, WriteError, write_guard

CHECKPOINT_PREFIX = "step-"



def checkpoint_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones live under a `.tmp-` name and are never listed."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / "counters.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(output_dir, resume: Optional[str]) -> Optional[Path]:
    """`latest` → the newest complete checkpoint (None when there is none yet); a path → that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "counters.json").is_file():
        raise PathNotFoundError(f"train.resume={resume!r} is not a complete checkpoint folder (no counters.json); "
                                f"use 'latest' or one of {checkpoint_dir(output_dir)}/step-*")
    return path


def _discard(path: Path) -> None:
    """Delete a checkpoint folder so that a crash midway never leaves a half-deleted folder under a valid name:
    rename it out of the `step-` namespace first (atomic), then remove it."""
    trash = path.with_name(f".del-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def last_good_checkpoint(output_dir) -> str:
    """The newest complete checkpoint, as error messages name it ("none yet in …" before the first)."""
    kept = list_checkpoints(output_dir)
    return str(kept[-1]) if kept else f"none yet in {checkpoint_dir(output_dir)}"


def save_checkpoint(accelerator: Accelerator, task, cfg, step: int) -> Optional[Path]:
    """accelerate state + our counters + extra tensors, written to `.tmp-step-N` then renamed (atomic on POSIX).

    A failed write (a full disk: torch reports it as "inline_container.cc … unexpected pos") raises a `WriteError`
    naming the folder, the free space and the last good checkpoint, which stays the latest; the partial folder is
    removed to give the space back.
    """
    root = checkpoint_dir(cfg.train.output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}"
    # Never let non-finite weights become the latest checkpoint. Summed over ranks, so that all of them stop together
    # even when each holds only a shard (FSDP).
    bad = torch.tensor(sum(int(not torch.isfinite(p.detach()).all()) for p in task.all_params()), device=accelerator.device)
    bad = int(accelerator.reduce(bad, reduction="sum"))
    if bad:
        raise FloatingPointError(f"{bad} trainable tensor(s) are not finite at step {step}; not writing a checkpoint, "
                                 f"so the last good one stays the latest in {root}")
    try:
        with write_guard(final, last_good_checkpoint(cfg.train.output_dir)):  # named as it would have been
            _write_checkpoint_files(accelerator, task, cfg, step, tmp)
    except WriteError:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():  # re-saving a step (a resume from an older checkpoint): the new state wins
            _discard(final)
        os.replace(tmp, final)
        for old in list_checkpoints(cfg.train.output_dir)[: -cfg.train.checkpoints_total_limit]:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint_files(accelerator: Accelerator, task, cfg, step: int, tmp: Path) -> None:
    """Everything a checkpoint holds, into the temporary folder `tmp` (renamed into place by the caller)."""
    root = tmp.parent
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".del-*")]:  # left behind by a crash mid-write or mid-delete
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank takes part (RNG states per rank; sharded states under FSDP)
    # Important: every rank must be done writing into `tmp` before the main one renames it (a slower rank's file
    # would land in a folder that no longer exists, measured with a discriminator's extra model file on 2 ranks).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        extra = task.extra_state()
        if extra:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(tmp / "extra_state.safetensors"))
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        # counters.json is written last: its presence marks the folder complete.
        (tmp / "counters.json").write_text(json.dumps({"global_step": step}))


def load_checkpoint(accelerator: Accelerator, task, path: Path) -> int:
    """Restore accelerate state and our extra tensors; returns the optimiser step to continue from."""
    accelerator.load_state(str(path))
    extra = path / "extra_state.safetensors"
    if extra.is_file():
        task.load_extra_state(load_file(str(extra)))
    return json.loads((path / "counters.json").read_text())["global_step"]
