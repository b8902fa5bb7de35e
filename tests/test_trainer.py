import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from lcm.config import load_config
from lcm.checkpoints import list_checkpoints, resolve_resume, save_checkpoint
from lcm.trainer import TrainingTask, clip_and_step
from lcm.seeds import rank_seed, step_generator


def _linear_with_grad(scale):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, scale)
    return model


def _grad_norm(model):
    return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()


@pytest.mark.parametrize("max_norm", [0.1, 0.0])
def test_clipping_really_clips_the_update(max_norm):
    # SGD with lr 1 makes the update equal the gradient it used: its norm must be the clipped norm.
    accelerator = Accelerator(cpu=True)
    model = _linear_with_grad(5.0)
    raw_norm = _grad_norm(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    reported = clip_and_step(accelerator, list(model.parameters()), opt, sched, max_norm)
    update = torch.sqrt(sum((p.detach() - b).pow(2).sum() for p, b in zip(model.parameters(), before))).item()
    if max_norm > 0:
        assert update == pytest.approx(max_norm, rel=1e-4)
        assert float(reported) == pytest.approx(raw_norm, rel=1e-5)
    else:
        assert update == pytest.approx(raw_norm, rel=1e-5) and reported is None
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_rank_seeds_distinct_and_step_generators_reproducible():
    assert len({rank_seed(3, r, 4) for r in range(4)}) == 4
    a = torch.randn(5, generator=step_generator(0, 0, 1, 7, 0, "cpu"))
    b = torch.randn(5, generator=step_generator(0, 0, 1, 7, 0, "cpu"))
    c = torch.randn(5, generator=step_generator(0, 0, 1, 8, 0, "cpu"))
    d = torch.randn(5, generator=step_generator(0, 1, 2, 7, 0, "cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def _cfg(tmp_path, limit=2):
    return load_config(None, ["model.pretrained=x", "data.path=y", f"train.output_dir={tmp_path}",
                              f"train.checkpoints_total_limit={limit}"])


def _task():
    model = torch.nn.Linear(2, 2)
    return model, TrainingTask(model=model, params=list(model.parameters()), dataset=[], collate_fn=None,
                               loss_fn=None, extra_state=lambda: {"ema.0": torch.ones(3)})


def test_checkpoints_keep_last_k_and_resume_latest(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, task = _task()
    accelerator.prepare(model)
    cfg = _cfg(tmp_path, limit=2)
    for step in (1, 2, 3):
        save_checkpoint(accelerator, task, cfg, step)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000002", "step-000003"]
    assert resolve_resume(tmp_path, "latest").name == "step-000003"
    assert (tmp_path / "checkpoints/step-000003/extra_state.safetensors").is_file()
    assert "checkpoints_total_limit: 2" in (tmp_path / "checkpoints/step-000003/config.yaml").read_text()


def test_crash_while_writing_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model, task = _task()
    accelerator.prepare(model)
    cfg = _cfg(tmp_path, limit=3)
    save_checkpoint(accelerator, task, cfg, 10)

    def dies_midway(path, **kw):
        with open(f"{path}/model.safetensors", "wb") as f:  # a half-written file, then the process dies
            f.write(b"half")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(accelerator, "save_state", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, task, cfg, 20)
    latest = resolve_resume(tmp_path, "latest")
    assert latest.name == "step-000010"
    assert json.loads((latest / "counters.json").read_text())["global_step"] == 10
    monkeypatch.undo()
    accelerator.load_state(str(latest))  # still loadable


def test_resume_from_nothing_and_bad_path(tmp_path):
    assert resolve_resume(tmp_path, "latest") is None
    assert resolve_resume(tmp_path, None) is None
    with pytest.raises(FileNotFoundError, match="train.resume"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_lr_warmup_from_config(tmp_path):
    from lcm.trainer import build_lr_scheduler, build_optimizer

    cfg = load_config(None, ["model.pretrained=x", "data.path=y", "optim.lr_warmup_steps=4", "optim.lr=1.0"])
    p = [torch.nn.Parameter(torch.zeros(1))]
    opt = build_optimizer(p, cfg.optim)
    sched = build_lr_scheduler(opt, cfg.optim, 10, 1)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    if importlib.util.find_spec("bitsandbytes") is not None:
        return
    with pytest.raises(ImportError, match="bitsandbytes"):
        build_optimizer(p, SimpleNamespace(**{**dict(cfg.optim), "use_8bit_adam": True}))


@pytest.mark.parametrize("name,warmup", [("cosine", 2), ("linear", 0), ("constant_with_warmup", 3)])
def test_lr_segments_restart_the_diffusers_schedule_at_each_boundary(name, warmup):
    """Segment i follows diffusers' own schedule built for its steps alone; without segments it is that schedule
    over the whole run (so a restart is visible: the first step of segment 2 is back at the warm-up's start)."""
    from diffusers.optimization import get_scheduler

    from lcm.trainer import build_lr_scheduler

    cfg = SimpleNamespace(lr_scheduler=name, lr_warmup_steps=warmup)

    def lrs(sched, opt, n):
        out = []
        for _ in range(n):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    def run(segments, steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        return lrs(build_lr_scheduler(opt, cfg, steps, 1, segments), opt, steps)

    def alone(steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        return lrs(get_scheduler(name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=steps), opt, steps)

    assert run([5, 7, 4], 16) == pytest.approx(alone(5) + alone(7) + alone(4))
    assert run(None, 16) == pytest.approx(alone(16))
    assert run([16], 16) == pytest.approx(alone(16))
    if warmup:
        assert run([5, 7, 4], 16)[5] == pytest.approx(0.0) and alone(16)[5] > 0
    with pytest.raises(ValueError, match="sum to 16"):
        run([5, 7], 16)


# --- a full disk (issue 14 item 3) -------------------------------------------------------------------------------

_TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240"


def _disk_full(kind):
    import errno

    if kind == "torch":  # what torch.save raises when the disk fills up mid-write
        return RuntimeError(_TORCH_DISK_FULL)
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where, kind", [("torch.save", "torch"), ("safetensors", "enospc")])
def test_full_disk_while_checkpointing_names_path_space_and_last_good(tmp_path, monkeypatch, where, kind):
    import lcm.checkpoints
    from lcm.errors import WriteError

    accelerator = Accelerator(cpu=True)
    model, task = _task()
    accelerator.prepare(model)
    cfg = _cfg(tmp_path, limit=3)
    good = save_checkpoint(accelerator, task, cfg, 10)
    before = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}

    def full(*args, **kwargs):
        raise _disk_full(kind)

    if where == "torch.save":  # inside accelerate's real save_state (optimizer / RNG states go through torch.save)
        monkeypatch.setattr(torch, "save", full)
    else:  # our extra-state file
        monkeypatch.setattr(lcm.checkpoints, "save_file", full)
    with pytest.raises(WriteError) as err:
        save_checkpoint(accelerator, task, cfg, 20)
    message = str(err.value)
    assert f"could not write {tmp_path / 'checkpoints' / 'step-000020'}" in message
    assert (_TORCH_DISK_FULL if kind == "torch" else "No space left on device") in message
    assert f"free on {tmp_path / 'checkpoints'}" in message
    assert f"last good checkpoint: {good}" in message and "\n" not in message
    # The previous checkpoint is intact and still the latest; the half-written one is gone.
    assert resolve_resume(tmp_path, "latest") == good
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == before
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()
    accelerator.load_state(str(good))


def test_full_disk_while_exporting_names_final_and_last_good(tmp_path):
    """The final export after training: the message names final/, the free space and the checkpoint to resume."""
    from lcm.errors import WriteError
    from lcm.trainer import make_accelerator, train

    cfg = load_config(None, ["model.pretrained=x", "data.path=y", f"train.output_dir={tmp_path}",
                             "train.max_train_steps=1", "train.checkpoint_every=1", "train.batch_size=2",
                             "train.report_to=none", "validation.every_n_steps=0"])
    accelerator = make_accelerator(cfg.train)
    model = torch.nn.Linear(2, 1)

    def export(final):
        raise _disk_full("torch")

    task = TrainingTask(model=model, params=list(model.parameters()), dataset=[torch.ones(2)] * 4,
                        collate_fn=torch.stack, loss_fn=lambda m, batch, gens: (m(batch).pow(2).sum(1), {}),
                        export=export)
    with pytest.raises(WriteError) as err:
        train(cfg, accelerator, task)
    message = str(err.value)
    assert f"could not write {tmp_path / 'final'}" in message and "free on" in message
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step-000001'}" in message


def test_full_disk_in_export_lora_run_is_a_write_error(tmp_path, monkeypatch):
    import lcm.export
    from lcm.errors import WriteError

    def full(*args, **kwargs):
        raise _disk_full("enospc")

    monkeypatch.setattr(lcm.export, "save_lora", full)
    with pytest.raises(WriteError, match=rf"could not write {tmp_path / 'final'}: OSError: .*No space left.* free on"):
        lcm.export.export_lora_run(None, None, {}, None, tmp_path / "final", 1)
