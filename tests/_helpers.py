"""Helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_entry_script(name: str, root: Path = ROOT):
    """Import a top-level entry script (train_lcm_lora.py, train_lcd.py) as a module, to call its `main(argv)`;
    `root` is the checkout it comes from (benchmarks time an older commit's worktree)."""
    spec = importlib.util.spec_from_file_location(name, Path(root) / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sdxl_unet_inputs(unet, seed: int = 0) -> dict:
    """Seeded keyword inputs for a tiny SDXL UNet at 8×8 latents, batch 2, timesteps 999 and 259."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([999, 259]),
                encoder_hidden_states=torch.randn(2, 77, c.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, text_dim, generator=g),
                                   "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)})


def data_cfg(path, **overrides):
    """A real, typed `data:` config section (DataConfig defaults) for `path`, with field overrides."""
    from omegaconf import OmegaConf

    from lcm.config import DataConfig

    return OmegaConf.structured(DataConfig(path=str(path), **overrides))


def free_port() -> int:
    """A TCP port free right now on localhost, for a launched run's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script: Path, args: list[str], num_processes: int = 2, timeout: int = 300):
    """Run `script args` as `num_processes` CPU processes under `accelerate launch`; the finished CompletedProcess.

    accelerate's `--cpu` launcher starts one process unless MPI is set up; torchrun (the `--multi_gpu` launcher)
    starts the ranks, and ACCELERATE_USE_CPU makes each a MULTI_CPU (gloo) process on a machine without GPUs.
    """
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


MIXED_SIZES = [(24, 24), (30, 20), (20, 36), (26, 26), (40, 24), (24, 24)]  # (w, h): crops and flips differ per item


def mixed_size_image_folder(root: Path) -> Path:
    """Captioned images of several aspect ratios (so centre crops and flipped crop offsets are non-trivial)."""
    from PIL import Image

    from lcm.tiny import make_captioned_image_folder

    folder = make_captioned_image_folder(root, n=len(MIXED_SIZES), size=24)
    for i, size in enumerate(MIXED_SIZES):
        path = folder / f"{i:04d}.png"
        Image.open(path).resize(size).save(path)
    return folder


def png_bytes(size, seed: int) -> bytes:
    """A PNG of seeded random pixels, `size` = (w, h) as PIL counts it."""
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def randomise_lora_b(model, seed: int) -> None:
    """lora_B starts at zero (the LoRA would be a no-op); seeded non-zero values make every tensor distinct, as after
    training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def write_lora_run(tiny_sdxl_dir, run: Path, rank: int, alpha: float, seed: int = 1) -> Path:
    """A finished run folder (config.yaml + final/) for the tiny SDXL teacher, as train_lcm_lora.py leaves it, written
    by the real export_lora_run with seeded non-zero adapters."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from lcm.config import LCM_LORA_TARGETS, load_config, to_yaml
    from lcm.export import export_lora_run
    from lcm.lora import add_lora

    cfg = load_config("demo_lcm_lora", [f"model.pretrained={tiny_sdxl_dir}", f"lora.rank={rank}",
                                        f"lora.alpha={alpha}", f"train.output_dir={run}"])
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    add_lora(unet, rank, alpha, LCM_LORA_TARGETS)
    randomise_lora_b(unet, seed)
    scheduler = EulerDiscreteScheduler.load_config(tiny_sdxl_dir, subfolder="scheduler")
    export_lora_run(unet, StableDiffusionXLPipeline, scheduler, cfg, run / "final", steps_trained=1)
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def save_noisy_mini_lora(out: Path) -> Path:
    """A rank-4 LoRA on the mini teacher with small random adapters (a stand-in student), saved by save_lora."""
    from diffusers import StableDiffusionXLPipeline

    from lcm.cli import MINI_TEACHER
    from lcm.config import LCM_LORA_TARGETS
    from lcm.lora import add_lora, save_lora

    pipe = StableDiffusionXLPipeline.from_pretrained(MINI_TEACHER)
    params = add_lora(pipe.unet, 4, 4, LCM_LORA_TARGETS)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    save_lora(pipe.unet, out, StableDiffusionXLPipeline)
    return out


def sample_cli(teacher, run, out, prompts, *extra):
    """`lcm sample` of a run's LoRA on `teacher` at seeds 0 and 1, 16 px, CPU fp32, into the grid `out`; the grid as an
    array (what the trainer's own validation sampling is compared against)."""
    import numpy as np
    from PIL import Image

    from lcm.cli import main as lcm_main

    args = ["sample", "--base", str(teacher), "--lora", str(run), "--seeds", "0,1", "--height", "16", "--width", "16",
            "--device", "cpu", "--dtype", "fp32", "--out", str(out), *extra]
    for p in prompts:
        args += ["--prompt", p]
    assert lcm_main(args) == 0
    return np.asarray(Image.open(out))


def lcd_unet_batch(indices):
    """A tiny SDXL UNet with seeded non-zero LoRA adapters, a 2-sample LCDBatch at grid `indices` (w 0.5 and 1.0) and
    the N = 50 LCDSpec: the fixture the objective tests share."""
    from lcm.config import LCM_LORA_TARGETS
    from lcm.consistency import LCDBatch, LCDSpec
    from lcm.lora import add_lora
    from lcm.schedule import NoiseSchedule, SolverGrid, scaled_linear_alphas_cumprod
    from lcm.tiny import build_tiny_sdxl_pipeline

    unet = build_tiny_sdxl_pipeline(seed=0).unet
    add_lora(unet, 4, 4, LCM_LORA_TARGETS)
    randomise_lora_b(unet, seed=1)
    inputs = sdxl_unet_inputs(unet)
    cond = {"encoder_hidden_states": inputs["encoder_hidden_states"], **inputs["added_cond_kwargs"]}
    uncond = {k: torch.zeros_like(v) if k != "time_ids" else v for k, v in cond.items()}
    g = torch.Generator().manual_seed(0)
    batch = LCDBatch(z0=torch.randn(2, 4, 8, 8, generator=g), noise=torch.randn(2, 4, 8, 8, generator=g),
                     index=torch.tensor(indices), w=torch.tensor([0.5, 1.0]), cond=cond, uncond=uncond)
    return unet, batch, LCDSpec(NoiseSchedule(scaled_linear_alphas_cumprod()), SolverGrid(1000, 50))
