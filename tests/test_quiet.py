"""What a new user reads on every run (issue 14 item 6): no deprecation or third-party noise from loading a
pipeline, and the demo's step labels count once each."""

import argparse
import os
import re
import subprocess
import sys

import pytest

from _helpers import ROOT

# Each was printed on every load: diffusers' `torch_dtype` deprecation (we now pass `dtype`), its "keep in float32"
# warning (we cast the VAE after loading; now it loads in fp32), transformers' torchvision notice (filtered: lcm never
# runs an image processor).
NOISE = ["torch_dtype", "should be kept in float32", "requires torchvision"]

LOAD = """
import logging, torch
logging.basicConfig(level=logging.INFO)  # show every warning the libraries log, as the train scripts do
from lcm.models import load_pipeline
from lcm.sampling import load_pipeline_for_sampling
for dtype in (torch.float32, torch.bfloat16):
    pipe = load_pipeline("sdxl", {path!r}, dtype)
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == dtype
load_pipeline("sdxl", {path!r}, without=("vae", "text_encoder", "text_encoder_2"))
load_pipeline_for_sampling({path!r}, dtype="fp32")
print("loaded")
"""


def test_loading_a_pipeline_prints_no_library_noise(tiny_sdxl_dir):
    # A fresh interpreter: these warnings are emitted once per process, so an in-process check after other tests
    # imported diffusers would pass for the wrong reason. -W always shows every Python warning, repeated or not.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-W", "always", "-c", LOAD.format(path=str(tiny_sdxl_dir))], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr
    output = proc.stdout + proc.stderr
    for message in NOISE:
        assert message not in output, f"{message!r} printed:\n{output}"


def test_log_filter_drops_only_the_torchvision_notice():
    import logging

    import lcm  # noqa: F401  (installs the filters)

    logger = logging.getLogger("transformers.utils.import_utils")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                       "`CLIPImageProcessorPil` for backward compatibility.")
        logger.warning("something else about torchvision")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["something else about torchvision"]


@pytest.mark.parametrize("lcd, total", [(True, 5), (False, 4)])
def test_demo_step_labels_count_once_each(monkeypatch, capsys, tmp_path, lcd, total):
    """`lcm demo` printed "[2/4]" twice (the LoRA run and the full-LCD run)."""
    import lcm.digits
    from lcm import cli

    monkeypatch.setattr(cli, "_train", lambda *a, **k: None)
    monkeypatch.setattr(cli, "_sample_grid", lambda *a, **k: None)
    monkeypatch.setattr(cli, "cmd_eval", lambda args: 0)
    monkeypatch.setattr(lcm.digits, "export_digits_folder", lambda *a, **k: None)
    args = argparse.Namespace(root=str(tmp_path), tiny=False, lcd=lcd, eval_n=2, teacher_w=0.5, overrides=[])
    assert cli.cmd_demo(args) == 0
    labels = re.findall(r"^\[(\d+)/(\d+)\]", capsys.readouterr().out, flags=re.MULTILINE)
    assert labels == [(str(i), str(total)) for i in range(1, total + 1)]
