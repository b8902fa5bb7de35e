"""How much the latent cache can speed up training at most: floating-point operations of one LCM-LoRA step with and
without the encoders, counted by `torch.utils.flop_counter.FlopCounterMode`.

The cache removes the VAE encode and the text encoders from a step and nothing else, so with f = encoder FLOPs / all
step FLOPs the speed-up is at most 1 / (1 − f) when time follows FLOPs (Amdahl's law). Image decoding and resizing,
which the cache removes too, are not FLOPs and are not in this count; nor are the dtypes (the VAE runs in fp32 while
the UNet may run in bf16, which makes the VAE's share of *time* larger than its share of FLOPs on a GPU).

Both steps are the trainer's own code: `lcd_batch_from_data` (a batch of images + captions, or the cached μ, σ and
text conditioning) then `lcd_loss` (student with LoRA, one batched CFG teacher call, target) and the backward pass.

- tiny / tiny-M / mini: the tiny SDXL-architecture teachers at two sizes and the shipped mini teacher, at the
  settings of `benchmarks/bench_cache.py` (16 or 32 px, batch 16, LoRA rank 8), counted on CPU tensors; printed beside
  the speed-up that benchmark measured, which also includes image decoding and the encoders' per-call overhead.
- full: SDXL at its published sizes (UNet and VAE from `configs/sdxl_*.json`, the two CLIP text encoders from
  `configs/sdxl_text_encoder*.json`) on the `meta` device, which carries shapes and no data, so nothing is allocated
  or computed: 1024², batch 4, gradient checkpointing, LoRA rank 64 (the GPU benchmark's setting), and 512².

    python -m benchmarks.flops_cache            # writes benchmarks/results/flops_cache.{json,md}
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_cache import TINY_M
from benchmarks.gpu_sdxl import CONFIGS
from benchmarks.harness import RESULTS_DIR, environment


def count_flops(fn) -> int:
    """FLOPs of everything `fn()` runs, forward and backward (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def published_config(name: str) -> dict:
    """A shipped architecture config (`configs/<name>`) as constructor keywords (diffusers' `_class_name` dropped)."""
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


def full_size_sdxl(device: str = "meta"):
    """An SDXL pipeline at the published sizes with random (or, on `meta`, no) weights; tokenizers are the tiny
    ones (prompts are padded to 77 tokens whatever the vocabulary, so the encoders' work is the same)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lcm.tiny import make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = [make_tokenizer(Path(tmp) / f"tok{i}") for i in (1, 2)]
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    with torch.device(device):  # only the models: the scheduler's tables are numpy-backed
        models = dict(
            vae=AutoencoderKL.from_config(published_config("sdxl_vae.json")),
            text_encoder=CLIPTextModel(CLIPTextConfig(**published_config("sdxl_text_encoder.json"))),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**published_config("sdxl_text_encoder_2.json"))),
            unet=UNet2DConditionModel.from_config(published_config("sdxl_base_unet.json")))
    return StableDiffusionXLPipeline(**models, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], scheduler=scheduler,
                                     add_watermarker=False)


def image_batch(batch: int, resolution: int, device: str) -> dict:
    """A data-loader batch of square images as `lcm.data` collates them."""
    size = torch.tensor([[resolution, resolution]] * batch)
    return {"pixel_values": torch.zeros(batch, 3, resolution, resolution, device=device),
            "caption": ["a photograph of a small red house by a lake"] * batch,
            "original_size": size, "crop_top_left": torch.zeros(batch, 2, dtype=torch.long), "target_size": size}


def step_flops(pipe, batch: int, resolution: int, rank: int, checkpointing: bool, device: str) -> dict:
    """FLOPs of one training step from images and from the cache, and of the encoders alone."""
    from lcm.config import LCM_LORA_TARGETS, DistillConfig
    from lcm.consistency import LCDSpec, lcd_loss
    from lcm.encode import encode_batch, lcd_batch_from_data
    from lcm.lora import add_lora
    from lcm.models import noise_schedule_of
    from lcm.roles import base_role, denoiser_role
    from lcm.schedule import SolverGrid
    from lcm.seeds import sample_generators

    unet = pipe.unet
    add_lora(unet, rank, rank, LCM_LORA_TARGETS)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    spec = LCDSpec(noise_schedule_of(pipe.scheduler), SolverGrid(1000, 50))
    distill = DistillConfig()
    images = image_batch(batch, resolution, device)
    with torch.no_grad():
        mu, sigma, cond, uncond = encode_batch(pipe, images, device)
    cached = {"latent_mean": mu, "latent_std": sigma, "cond": cond, "uncond": uncond, "caption": images["caption"]}

    def step(data: dict) -> None:
        lcd = lcd_batch_from_data(pipe, data, sample_generators(0, 0, batch), distill, spec.grid, device)
        loss, _ = lcd_loss(denoiser_role(unet), denoiser_role(unet), base_role(unet), lcd, spec)
        loss.mean().backward()

    return {"encoders": count_flops(lambda: encode_batch(pipe, images, device)),
            "step_images": count_flops(lambda: step(images)), "step_cache": count_flops(lambda: step(cached)),
            "latent_shape": list(mu.shape)}


def _measured_speedups() -> dict:
    """The cache speed-ups `benchmarks/bench_cache.py` last measured, by model, if its results are here."""
    path = RESULTS_DIR / "bench_cache.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    return {r["name"].split(":")[0]: r["value"] for r in report.get("ratios", [])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)

    from lcm.cli import MINI_TEACHER
    from lcm.models import load_pipeline
    from lcm.tiny import build_tiny_sdxl_pipeline

    torch.manual_seed(0)
    small = dict(batch=16, rank=8, checkpointing=False, device="cpu")  # bench_cache.py's settings
    cases = [("tiny", lambda: build_tiny_sdxl_pipeline(), dict(small, resolution=16)),
             ("tiny-M", lambda: build_tiny_sdxl_pipeline(**TINY_M), dict(small, resolution=32)),
             ("mini", lambda: load_pipeline("sdxl", str(MINI_TEACHER)), dict(small, resolution=16)),
             ("full SDXL 1024²", full_size_sdxl, dict(batch=4, resolution=1024, rank=64, checkpointing=True,
                                                      device="meta")),
             ("full SDXL 512²", full_size_sdxl, dict(batch=4, resolution=512, rank=64, checkpointing=True,
                                                     device="meta"))]
    measured = _measured_speedups()
    rows = []
    for name, build, params in cases:
        counts = step_flops(build(), **params)
        share = counts["encoders"] / counts["step_images"]
        rows.append({"model": name, **params, **counts, "encoder_share": share,
                     "ceiling": counts["step_images"] / counts["step_cache"], "measured": measured.get(name)})
        print(f"{name}: encoders {share:.1%} of the step's FLOPs → cache speed-up ≤ {rows[-1]['ceiling']:.3f}×")
    report = {"title": "Latent cache: FLOPs of one LCM-LoRA step", "command": "python -m benchmarks.flops_cache",
              "environment": environment(torch.get_num_threads()), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flops_cache.json").write_text(json.dumps(report, indent=2))
    (args.out / "flops_cache.md").write_text(to_markdown(report))
    return report


def to_markdown(report: dict) -> str:
    lines = [f"## {report['title']}", "", f"`{report['command']}` (commit {report['environment']['commit']})", "",
             "| model | image px | batch | grad ckpt | encoders GFLOP | step from images GFLOP | step from cache GFLOP "
             "| encoder share | speed-up ceiling | measured speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        measured = "—" if r["measured"] is None else f"{r['measured']:.3f}×"
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {'yes' if r['checkpointing'] else 'no'} "
                     f"| {r['encoders'] / 1e9:,.1f} | {r['step_images'] / 1e9:,.1f} | {r['step_cache'] / 1e9:,.1f} "
                     f"| {r['encoder_share']:.1%} | {r['ceiling']:.3f}× | {measured} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
