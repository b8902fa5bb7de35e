"""Helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_entry_script(name: str):
    """Import a top-level entry script (train_lcm_lora.py, train_lcd.py) as a module, to call its `main(argv)`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
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


def png_bytes(size, seed: int) -> bytes:
    """A PNG of seeded random pixels, `size` = (w, h) as PIL counts it."""
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def launch_cpu_ranks(script_args: list[str], n: int = 2, timeout: float = 300):
    """Run train_lcm_lora.py as `n` CPU ranks (gloo DDP) under `accelerate launch`; returns the CompletedProcess.

    accelerate's `--cpu` launcher starts one process unless MPI is set up; torchrun (the `--multi_gpu` launcher) starts
    the ranks, and ACCELERATE_USE_CPU makes each a MULTI_CPU (gloo) process on a machine without GPUs.
    """
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), str(ROOT / "train_lcm_lora.py"), *script_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
