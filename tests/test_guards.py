"""Guards: a non-finite loss stops the run and keeps the last good checkpoint; a LoRA for another base is refused with
the first mismatched module named; weights load only through safe paths; no remote code anywhere."""

import ast
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from lcm.config import LCM_LORA_TARGETS, load_config
from lcm.lora import add_lora, check_lora_matches, load_lora_into_training_unet, lora_state_dict, save_lora
from lcm.tiny import build_tiny_sdxl_pipeline, make_captioned_image_folder
from lcm.checkpoints import list_checkpoints, resolve_resume, save_checkpoint
from lcm.trainer import TrainingTask

from _helpers import load_entry_script

ROOT = Path(__file__).resolve().parents[1]


def _train_script():
    return load_entry_script("train_lcm_lora")

def _args(teacher, data, out, *extra):
    return ["--config", "demo_lcm_lora", f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={out}",
            "data.resolution=16", "train.batch_size=2", "train.report_to=none", "lora.rank=4", "lora.alpha=4",
            "validation.every_n_steps=0", *extra]


# --------------------------------------------------------------------------------------------------- non-finite loss


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_sdxl_dir, tmp_path):
    # lr = 1e30 without warm-up: Adam's first update moves every lora_B entry by ~1e30 (finite, checkpointed at step
    # 1); the second forward pass then overflows to inf/NaN.
    data = make_captioned_image_folder(tmp_path / "data", n=4, size=16)
    out = tmp_path / "run"
    train = _train_script()
    with pytest.raises(FloatingPointError, match=r"in step 2 .*Last good checkpoint: .*step-000001"):
        train.main(_args(tiny_sdxl_dir, data, out, "optim.lr=1e30", "optim.lr_warmup_steps=0",
                         "train.max_train_steps=4", "train.checkpoint_every=1"))
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert not (out / "final").exists()
    adapters = load_file(out / "checkpoints/step-000001/lora_adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in adapters.values())
    # Loadable through the real resume path: nothing left to train at max_train_steps=1, so it loads and exports.
    assert train.main(_args(tiny_sdxl_dir, data, out, "optim.lr=1e30", "optim.lr_warmup_steps=0",
                            "train.max_train_steps=1", "--resume", "latest")) == 0
    final = load_file(out / "final/pytorch_lora_weights.safetensors")
    assert len(final) == len(adapters)


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    task = TrainingTask(model=model, params=list(model.parameters()), dataset=[], collate_fn=None, loss_fn=None)
    accelerator.prepare(model)
    cfg = load_config(None, ["model.pretrained=x", "data.path=y", f"train.output_dir={tmp_path}"])
    save_checkpoint(accelerator, task, cfg, 1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="not finite at step 2"):
        save_checkpoint(accelerator, task, cfg, 2)
    assert resolve_resume(tmp_path, "latest").name == "step-000001"
    assert json.loads((tmp_path / "checkpoints/step-000001/counters.json").read_text()) == {"global_step": 1}


# ------------------------------------------------------------------------------------------- LoRA for another base


@pytest.fixture(scope="module")
def unets():
    """Two tiny SDXL UNets with the same module names but different widths, and a LoRA trained-shape on the first."""
    wide = build_tiny_sdxl_pipeline(seed=0).unet
    narrow = build_tiny_sdxl_pipeline(seed=0, block_out_channels=(16, 32)).unet
    source = build_tiny_sdxl_pipeline(seed=1).unet
    add_lora(source, rank=4, alpha=4, target_modules=LCM_LORA_TARGETS)
    with torch.no_grad():
        for n, p in source.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)  # as after training: B no longer zero
    return wide, narrow, source


def test_lora_for_a_different_base_names_the_first_mismatched_module(unets):
    wide, narrow, source = unets
    state = lora_state_dict(source)
    check_lora_matches(wide, state)  # same architecture: fine, with or without adapters attached
    # In model order the first adapted module is the first ResNet's conv1: 32 input channels there, 16 here.
    with pytest.raises(ValueError, match=r"first mismatch at module 'down_blocks\.0\.resnets\.0\.conv1'"):
        check_lora_matches(narrow, state)


def test_resume_into_a_different_base_or_rank_is_refused_before_loading(unets):
    _, narrow, source = unets
    state = lora_state_dict(source)
    target = build_tiny_sdxl_pipeline(seed=0, block_out_channels=(16, 32)).unet
    add_lora(target, rank=4, alpha=4, target_modules=LCM_LORA_TARGETS)
    with pytest.raises(ValueError, match=r"'down_blocks\.0\.resnets\.0\.conv1'"):
        load_lora_into_training_unet(target, state)
    other_rank = build_tiny_sdxl_pipeline(seed=0).unet
    add_lora(other_rank, rank=8, alpha=8, target_modules=LCM_LORA_TARGETS)
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 32, 3, 3\), this UNet needs \(8, 32, 3, 3\)"):
        load_lora_into_training_unet(other_rank, state)
    same = build_tiny_sdxl_pipeline(seed=0).unet
    add_lora(same, rank=4, alpha=4, target_modules=LCM_LORA_TARGETS)
    check_lora_matches(same, state)
    load_lora_into_training_unet(same, state)
    assert torch.equal(lora_state_dict(same)[next(iter(state))], state[next(iter(state))])


def test_checker_reads_what_diffusers_lora_state_dict_returns(unets, tmp_path):
    """The sampling-side recipe: `pipeline_cls.lora_state_dict(dir)` → `check_lora_matches(pipe.unet, state)`."""
    wide, narrow, source = unets
    save_lora(source, tmp_path, StableDiffusionXLPipeline)
    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path))
    assert all(k.startswith("unet.") for k in state)
    check_lora_matches(wide, state)
    with pytest.raises(ValueError, match=r"'down_blocks\.0\.resnets\.0\.conv1'"):
        check_lora_matches(narrow, state)
    with pytest.raises(ValueError, match="does not have, first: 'no_such.block'"):
        check_lora_matches(wide, {**state, "unet.no_such.block.lora_A.weight": torch.zeros(4, 8)})


# ------------------------------------------------------------------------------------------------- safe loading only


def _our_python_files():
    files = [*ROOT.glob("*.py"), *(ROOT / "lcm").rglob("*.py"), *(ROOT / "scripts").rglob("*.py"),
             *(ROOT / "benchmarks").rglob("*.py")]
    assert any(f.name == "trainer.py" for f in files)
    return files


def test_no_remote_code_and_no_unsafe_unpickling_in_our_code():
    offenders = []
    for path in _our_python_files():
        source = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        if "trust_remote_code" in source:
            offenders.append(f"{rel}: trust_remote_code")
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)):
                continue
            owner, name = node.func.value.id, node.func.attr
            if owner == "torch" and name == "load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
            if owner == "pickle" and name in ("load", "loads"):
                offenders.append(f"{rel}:{node.lineno}: pickle.{name}")
    assert not offenders, offenders


def test_accelerate_checkpoint_loading_is_weights_only(tmp_path, monkeypatch):
    """Our checkpoints are safetensors (adapters, EMA) plus accelerate's optimizer/scheduler/sampler/RNG files, which
    accelerate reads with torch.load(weights_only=True); nothing in them needs full unpickling."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    accelerator.save_state(str(tmp_path / "ckpt"))
    assert not list((tmp_path / "ckpt").glob("custom_checkpoint_*"))  # the one accelerate path that is not weights_only
    calls = []
    real_load = torch.load

    def checked_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert calls and all(w is True for w in calls), calls
