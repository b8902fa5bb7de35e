"""User errors end in one line on stderr and exit status 2, never a traceback (issue 14 item 7); LCM_DEBUG=1 shows the
traceback. Run as real subprocesses, exactly as a user types the commands."""

import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from _helpers import ROOT


def _run(*argv, debug=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LCM_DEBUG", None)
    if debug:
        env["LCM_DEBUG"] = "1"
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# tqdm progress bars ("Loading pipeline components...: 57%|█████▋ | 4/7 [...]") also go to stderr: progress, not errors.
_PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")


def _assert_one_line(proc, prog, *needles):
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not _PROGRESS.search(line)]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_dry_run_marks_missing_keys_then_one_line():
    """The first thing a new user types used to end in a ConfigError traceback."""
    proc = _run("train_lcm_lora.py", "--config", "lcm_lora_sdxl", "--dry-run")
    line = _assert_one_line(proc, "train_lcm_lora.py", "missing required config key(s): data.path", "data.path=")
    assert "path: ???  # <- missing: required, set data.path=…" in proc.stdout  # the resolved config was printed
    assert "pretrained: stabilityai/stable-diffusion-xl-base-1.0" in proc.stdout
    assert line.endswith("e.g. data.path=…")


def test_dry_run_of_a_complete_config_exits_0(tmp_path):
    proc = _run("train_lcm_lora.py", "--config", "lcm_lora_sdxl", "--dry-run", f"data.path={tmp_path}")
    assert proc.returncode == 0 and "missing" not in proc.stdout, proc.stderr


def test_bad_config_value_is_one_line_and_debug_shows_traceback(tmp_path):
    args = ("train_lcd.py", "--config", "mini_lcd", f"data.path={tmp_path}", "optim.lr=-1e-3")
    _assert_one_line(_run(*args), "train_lcd.py", "optim.lr=-0.001 is out of range: must be > 0")
    debug = _run(*args, debug=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("train_lcd.py: error: optim.lr=-0.001")


def test_unusable_data_folder_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    proc = _run("train_lcm_lora.py", "--config", "mini_lcm_lora", f"data.path={tmp_path}",
                f"train.output_dir={tmp_path / 'run'}", "train.report_to=none")
    _assert_one_line(proc, "train_lcm_lora.py", "no images", str(tmp_path))


def test_lora_that_does_not_fit_the_base_is_one_line(tiny_sdxl_dir, tmp_path):
    # A LoRA for another UNet: its first ResNet conv's lora_A takes 999 input channels, this base's takes 32.
    module = "unet.down_blocks.0.resnets.0.conv1"
    state = {f"{module}.lora_A.weight": torch.zeros(4, 999, 3, 3), f"{module}.lora_B.weight": torch.zeros(32, 4, 1, 1)}
    save_file(state, str(tmp_path / "other.safetensors"))
    proc = _run("-m", "lcm.cli", "sample", "--base", str(tiny_sdxl_dir), "--lora", str(tmp_path / "other.safetensors"),
                "--prompt", "a", "--seeds", "0", "--steps", "1", "--height", "16", "--width", "16",
                "--out", str(tmp_path / "x.png"))
    _assert_one_line(proc, "lcm", "LoRA does not match this UNet", "down_blocks.0.resnets.0.conv1")


def test_single_file_model_without_configs_is_one_line(tmp_path):
    """A checkpoint file that no config folder describes (no model.config_dir, nothing beside it, no shipped match)."""
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(7, 4, 3, 3)}, str(tmp_path / "m.safetensors"))
    proc = _run("-m", "lcm.cli", "sample", "--base", str(tmp_path / "m.safetensors"), "--prompt", "x",
                "--out", str(tmp_path / "g.png"))
    _assert_one_line(proc, "lcm", "model.config_dir")


def test_export_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    proc = _run("-m", "lcm.cli", "export", str(tmp_path), "--format", "kohya")
    _assert_one_line(proc, "lcm", f"{tmp_path} is not a finished training run")


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only UserError is turned into one line: any other exception still shows where it came from."""
    proc = _run("-c", "from lcm.errors import exit_on_user_error\n"
                      "def main():\n    raise KeyError('a bug')\n"
                      "exit_on_user_error(main)")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError" in proc.stderr


@pytest.mark.parametrize("cls", ["ConfigError", "DataError", "LoraMismatchError", "ModelError", "CacheError",
                                 "WriteError", "PathNotFoundError"])
def test_user_error_classes_share_the_base(cls):
    import lcm.cache
    import lcm.config
    import lcm.errors

    found = getattr(lcm.errors, cls, None) or getattr(lcm.config, cls, None) or getattr(lcm.cache, cls)
    assert issubclass(found, lcm.errors.UserError)
