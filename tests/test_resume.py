"""Kill and resume: SIGKILL a real training process right after a checkpoint, resume from `latest`, and get the very
same LoRA bits as a run that was never interrupted. And: a crash while a checkpoint is written or deleted never
leaves a broken folder under a valid checkpoint name."""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import lcm.checkpoints
from lcm.config import load_config
from lcm.tiny import make_captioned_image_folder
from lcm.checkpoints import list_checkpoints, resolve_resume, save_checkpoint
from lcm.trainer import DETERMINISTIC_ENV, TrainingTask

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 6
STEPS_PER_EPOCH = 3  # 10 images in batches of 2 = 5 batches; accumulating 2 per step: 2 full windows + 1 partial


ADVERSARIAL = ("distill.objective=lcd_adv", "adversarial.weight=0.5", "adversarial.warmup_steps=3",
               "adversarial.r1_gamma=0.1", "adversarial.head_hidden=8")
# SDXL-Lightning: three stages over the 6 steps (the kill lands inside one), MSE first, then the pair discriminator
LIGHTNING = ("distill.objective=lightning", "distill.stages=[4,2,1]", "adversarial.weight=0.5",
             "adversarial.r1_gamma=0.1", "adversarial.head_hidden=8")
EXTRA = {"lcd": (), "lcd_adv": ADVERSARIAL, "lightning": LIGHTNING}


def _args(teacher, data, out, objective="lcd"):
    """Everything random that training has, switched on: 10 images in batches of 2 with 2-batch accumulation (an
    epoch is 5 batches = 3 optimiser steps, the last a partial window), LoRA dropout, an EMA target, random crops and
    flips, LR warm-up; a checkpoint after every step, only the last 2 kept."""
    return ["--config", "demo_lcm_lora", f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={out}",
            "data.resolution=16", "data.center_crop=false", "data.random_flip=true", "train.batch_size=2",
            "train.gradient_accumulation_steps=2", "train.report_to=none", "lora.rank=4", "lora.alpha=4",
            "lora.dropout=0.1", "distill.ema_decay=0.5", "optim.lr_warmup_steps=2", "validation.every_n_steps=0",
            f"train.max_train_steps={MAX_STEPS}", "train.checkpoint_every=1", "train.checkpoints_total_limit=2",
            "train.seed=3", *EXTRA[objective]]


def _tensors_equal(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ in any bit (or are missing on one side)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def _optimizer_tensors(checkpoint: Path, name: str = "optimizer.bin") -> dict:
    """Adam's step counts and moments from one of accelerate's optimizer files."""
    state = torch.load(checkpoint / name, map_location="cpu", weights_only=True)
    return {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if torch.is_tensor(v)}


@pytest.fixture
def deterministic(monkeypatch):
    """LCM_DETERMINISTIC=1 for this test's runs (in-process and children); the global torch flag is restored after."""
    monkeypatch.setenv(DETERMINISTIC_ENV, "1")
    before = torch.are_deterministic_algorithms_enabled()
    yield {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", DETERMINISTIC_ENV: "1"}
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("objective", ["lcd", "lcd_adv", "lightning"])
def test_sigkill_after_a_random_checkpoint_then_resume_latest_is_bit_identical(tiny_sdxl_dir, tmp_path, deterministic,
                                                                               objective):
    """lcd_adv adds a discriminator with its own optimiser, warm-up and R1: its heads and Adam state must resume
    exactly too."""
    data = make_captioned_image_folder(tmp_path / "data", n=10, size=24)
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    script = str(ROOT / "train_lcm_lora.py")
    # A seeded random step, mid-epoch (an epoch boundary is the easy case: no batches to skip) and with steps left
    # after it, so the kill lands mid-run.
    kill_after = random.Random(2024).choice([s for s in range(1, MAX_STEPS - 1) if s % STEPS_PER_EPOCH])

    # 1. Start a real training process; SIGKILL it the moment checkpoint `kill_after` is complete (renamed into
    #    place). It may be writing the next checkpoint by then: that is part of what is tested.
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, script, *_args(tiny_sdxl_dir, data, killed, objective)],
                            env=deterministic, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    marker = killed / "checkpoints" / f"step-{kill_after:06d}" / "counters.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists(), "the run finished before the kill; the test proved nothing"
    latest = resolve_resume(killed, "latest")
    assert kill_after <= int(latest.name.split("-")[1]) < MAX_STEPS

    # 2. Resume from `latest` in a child process while the uninterrupted reference runs in this one (same thread
    #    count, same flags): two different processes must produce the same bits.
    resume_log = open(tmp_path / "resumed.log", "w")
    resumed = subprocess.Popen([sys.executable, script, *_args(tiny_sdxl_dir, data, killed, objective),
                                "--resume", "latest"],
                               env=deterministic, stdout=resume_log, stderr=subprocess.STDOUT, cwd=tmp_path)
    spec = importlib.util.spec_from_file_location("train_lcm_lora", script)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.main(_args(tiny_sdxl_dir, data, reference, objective)) == 0
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    resume_log.close()
    assert f"resumed from {latest} at step {latest.name.split('-')[1].lstrip('0')}" in \
        (tmp_path / "resumed.log").read_text()

    # 3. Bit-identical: the exported LoRA, and the final checkpoint's EMA target and Adam moments.
    final, last = "final/pytorch_lora_weights.safetensors", f"checkpoints/step-{MAX_STEPS:06d}"
    compared = [(final, load_file), (f"{last}/extra_state.safetensors", load_file), (last, _optimizer_tensors)]
    if objective != "lcd":  # the discriminator heads (accelerate's model file) and their Adam state
        compared += [(f"{last}/model.safetensors", load_file),
                     (last, lambda p: _optimizer_tensors(p, "optimizer_1.bin"))]
    for what, load in compared:
        differ = _tensors_equal(load(reference / what), load(killed / what))
        assert not differ, f"{what}: {len(differ)} tensor(s) differ after resume, first {differ[0]}"
    assert [p.name for p in list_checkpoints(killed)] == [f"step-{MAX_STEPS - 1:06d}", f"step-{MAX_STEPS:06d}"]
    assert not [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers cleaned


# ----------------------------------------------------------------------------------------- crash while (re)writing


def _linear_task(tmp_path, limit):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    task = TrainingTask(model=model, params=list(model.parameters()), dataset=[], collate_fn=None, loss_fn=None,
                        extra_state=lambda: {"ema.w": model.weight.detach().clone()})
    accelerator.prepare(model)
    cfg = load_config(None, ["model.pretrained=x", "data.path=y", f"train.output_dir={tmp_path}",
                             f"train.checkpoints_total_limit={limit}"])
    return accelerator, model, task, cfg


def _killed_midway(real_rmtree):
    """An rmtree on a checkpoint that is killed after deleting every file but counters.json (directory order is
    arbitrary, so the marker can well be the last to go); other rmtree calls behave normally."""

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        if any(f.name == "counters.json" for f in files):
            for f in files:
                if f.name != "counters.json":
                    f.unlink()
            raise KeyboardInterrupt(f"killed while deleting {path.name}")
        return real_rmtree(path, *args, **kwargs)

    return rmtree


@pytest.mark.parametrize("when", ["rotating out the oldest", "replacing the same step"])
def test_crash_while_deleting_a_checkpoint_never_leaves_a_broken_one_listed(tmp_path, monkeypatch, when):
    accelerator, model, task, cfg = _linear_task(tmp_path, limit=1 if when.startswith("rotating") else 3)
    save_checkpoint(accelerator, task, cfg, 1)
    save_checkpoint(accelerator, task, cfg, 2) if when.startswith("replacing") else None
    monkeypatch.setattr(lcm.checkpoints.shutil, "rmtree", _killed_midway(lcm.checkpoints.shutil.rmtree))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, task, cfg, 2)  # rotation deletes step 1 / a re-save replaces step 2
    monkeypatch.undo()
    # Whatever is listed is complete and loads; the half-deleted folder is out of the step- namespace.
    for ckpt in list_checkpoints(tmp_path):
        accelerator.load_state(str(ckpt))
        assert json.loads((ckpt / "counters.json").read_text())["global_step"] == int(ckpt.name.split("-")[1])
    assert resolve_resume(tmp_path, "latest") is not None
    # The next successful save clears what the crash left behind.
    save_checkpoint(accelerator, task, cfg, 3)
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert resolve_resume(tmp_path, "latest").name == "step-000003"
