"""The full-size SDXL GPU benchmark is ready for a GPU task: its shipped configs are SDXL's published architecture
(checked by parameter count on the meta device, nothing allocated), and the script runs end to end on CPU with tiny
configs so it cannot rot between GPU tasks."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from benchmarks import gpu_sdxl
from lcm.tiny import build_tiny_sdxl_pipeline


def _count(cls, path) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls.from_config(json.loads(Path(path).read_text())).parameters())


def test_shipped_configs_are_sdxl_base_sizes():
    assert _count(UNet2DConditionModel, gpu_sdxl.CONFIGS / "sdxl_base_unet.json") == 2_567_463_684
    assert _count(AutoencoderKL, gpu_sdxl.CONFIGS / "sdxl_vae.json") == 83_653_863


def test_gpu_benchmark_runs_on_cpu_with_tiny_configs(tmp_path):
    pipe = build_tiny_sdxl_pipeline()
    for name, module in (("unet", pipe.unet), ("vae", pipe.vae)):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(module.config)))
    report = gpu_sdxl.main(["--unet-config", str(tmp_path / "unet.json"), "--vae-config", str(tmp_path / "vae.json"),
                            "--train-resolution", "64", "--resolutions", "16", "--batch-size", "2", "--rank", "4",
                            "--device", "cpu", "--dtype", "fp32", "--no-compile", "--warmup", "1", "--repeats", "5",
                            "--out", str(tmp_path / "out")])
    assert [c["name"] for c in report["cases"]] == ["train 64² b2 ckpt", "generate 16² 4 steps fused"]
    assert all(c["n"] == 5 and c["median_s"] > 0 for c in report["cases"])
    assert (tmp_path / "out" / "gpu_sdxl.md").read_text().count("| train 64² b2 ckpt |") == 1
