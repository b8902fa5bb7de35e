"""Full-size SDXL on a GPU, with random weights built from the published architecture configs shipped beside this
file (`configs/sdxl_base_unet.json`: 2,567,463,684 UNet parameters; `configs/sdxl_vae.json`), so nothing is
downloaded:

- LCM-LoRA training step time and peak GPU memory: 1024², batch 4, gradient checkpointing, bf16 autocast with the UNet
  weights in bf16 and the LoRA (rank 64, the default targets) in fp32. The step is the UNet's share of training:
  `lcd_loss` (student, CFG teacher on 2B rows, target), backward, AdamW; latents and text embeddings are random
  tensors, as the latent cache provides them (`lcm cache`), so the VAE and text encoders are not in the step.
- 4-step 1024² generation latency with the LoRA fused, with and without `torch.compile` of the UNet: LCMScheduler's
  4 UNet calls (guidance_scale 1: no CFG pass) plus the VAE decode; the prompt embedding (two CLIP encoders, run once
  per prompt) is not timed.

    python -m benchmarks.gpu_sdxl [--repeats 5 --rounds 2]       # on a CUDA machine; writes results/gpu_sdxl.*

Every figure is a median of ≥ 5 timed runs after warm-up (compile happens during warm-up), each case in a fresh
process (benchmarks/harness.py), with CUDA synchronised inside the timed call.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.harness import Case, Ratio, bench_arg_parser, run_benchmark

CONFIGS = Path(__file__).resolve().parent / "configs"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _unet(config: str, device: str, dtype):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # allocate on the accelerator directly: 10 GB of fp32 init would crawl on the host
        unet = UNet2DConditionModel.from_config(json.loads(Path(config).read_text()))
    return unet.to(dtype=dtype)


def _cond(unet, batch: int, resolution: int, device: str, dtype) -> dict:
    """SDXL UNet conditioning of the right shapes: token states, pooled text, (h, w, 0, 0, h, w) micro-conditioning."""
    import torch

    c = unet.config
    text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    g = torch.Generator(device).manual_seed(1)
    return {"encoder_hidden_states": torch.randn(batch, 77, c.cross_attention_dim, generator=g, device=device,
                                                 dtype=dtype),
            "text_embeds": torch.randn(batch, text_dim, generator=g, device=device, dtype=dtype),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                     device=device, dtype=dtype)}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_train_step(unet_config: str, resolution: int, batch: int, device: str, dtype: str, rank: int,
                     checkpointing: bool):
    """One LCM-LoRA optimiser step on the UNet (see the module docstring for what is in it)."""
    import torch

    from lcm.config import LCM_LORA_TARGETS
    from lcm.consistency import LCDBatch, LCDSpec, lcd_loss
    from lcm.lora import add_lora
    from lcm.roles import base_role, denoiser_role
    from lcm.schedule import NoiseSchedule, SolverGrid, alphas_cumprod_from_config

    torch_dtype = getattr(torch, DTYPES[dtype])
    unet = _unet(unet_config, device, torch_dtype)
    params = add_lora(unet, rank, rank, LCM_LORA_TARGETS)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    spec = LCDSpec(NoiseSchedule(alphas_cumprod_from_config("scaled_linear", 1000, 0.00085, 0.012)),
                   SolverGrid(1000, 50))
    g = torch.Generator(device).manual_seed(0)
    side = resolution // 8  # the latent size SDXL's VAE (8× downsampling) would give
    cond = _cond(unet, batch, resolution, device, torch_dtype)
    data = LCDBatch(z0=torch.randn(batch, 4, side, side, generator=g, device=device),
                    noise=torch.randn(batch, 4, side, side, generator=g, device=device),
                    index=spec.grid.sample_index(batch, g, device),
                    w=torch.empty(batch, device=device).uniform_(3.0, 15.0, generator=g),
                    cond=cond, uncond={k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()})
    student, teacher = denoiser_role(unet), base_role(unet)
    autocast = torch.autocast(device.split(":")[0], dtype=torch_dtype, enabled=torch_dtype != torch.float32)

    def step():
        with autocast:
            per_sample, _ = lcd_loss(student, student, teacher, data, spec)
        per_sample.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)

    return step


def build_generate(unet_config: str, vae_config: str, resolution: int, steps: int, device: str, dtype: str,
                   rank: int, compile_unet: bool):
    """One 4-step (by default) LCMScheduler generation with a fused LoRA, VAE decode included."""
    import torch
    from diffusers import AutoencoderKL

    from lcm.config import LCM_LORA_TARGETS
    from lcm.lora import add_lora
    from lcm.sampling import lcm_scheduler_for

    torch_dtype = getattr(torch, DTYPES[dtype])
    unet = _unet(unet_config, device, torch_dtype)
    with torch.no_grad():
        for p in add_lora(unet, rank, rank, LCM_LORA_TARGETS):
            p.normal_(std=1e-3)  # a non-zero adapter, so fusing does real work
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()  # a plain UNet with the LoRA merged in, as `lcm sample --fuse` leaves it
    unet.eval().requires_grad_(False)
    with torch.device(device):
        vae = AutoencoderKL.from_config(json.loads(Path(vae_config).read_text()))
    vae = vae.to(dtype=torch_dtype).eval().requires_grad_(False)
    if compile_unet:
        unet.compile(fullgraph=False)
    scheduler = lcm_scheduler_for({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                   "beta_schedule": "scaled_linear", "prediction_type": "epsilon"})
    cond = _cond(unet, 1, resolution, device, torch_dtype)
    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SDXL's VAE
    g = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def step():
        latents = torch.randn(1, 4, side, side, generator=g, device=device, dtype=torch_dtype)
        scheduler.set_timesteps(steps, device=device)
        for t in scheduler.timesteps:
            eps = unet(latents, t, encoder_hidden_states=cond["encoder_hidden_states"],
                       added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
            latents = scheduler.step(eps, t, latents, generator=g).prev_sample
        vae.decode(latents / vae.config.scaling_factor)
        _sync(device)

    return step


def main(argv=None) -> dict:
    p = bench_arg_parser(__doc__.splitlines()[0])
    p.add_argument("--unet-config", default=str(CONFIGS / "sdxl_base_unet.json"))
    p.add_argument("--vae-config", default=str(CONFIGS / "sdxl_vae.json"))
    p.add_argument("--resolutions", default="1024", help="comma list of image sizes for the generation cases")
    p.add_argument("--train-resolution", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    p.set_defaults(warmup=3)  # compile happens in the first calls
    args = p.parse_args(argv)
    common = dict(unet_config=args.unet_config, device=args.device, dtype=args.dtype, rank=args.rank)
    cases = [Case(f"train {args.train_resolution}² b{args.batch_size} ckpt", build_train_step,
                  dict(common, resolution=args.train_resolution, batch=args.batch_size, checkpointing=True),
                  units=args.batch_size, unit="sample")]
    ratios = []
    for res in (int(r) for r in args.resolutions.split(",")):
        gen = dict(common, vae_config=args.vae_config, resolution=res, steps=args.steps)
        cases.append(Case(f"generate {res}² {args.steps} steps fused", build_generate, dict(gen, compile_unet=False),
                          unit="image"))
        if not args.no_compile:
            cases.append(Case(f"generate {res}² {args.steps} steps fused+compile", build_generate,
                              dict(gen, compile_unet=True), unit="image"))
            ratios.append(Ratio(f"{res}²: compiled / eager", cases[-1].name, cases[-2].name))
    return run_benchmark(f"Full-size SDXL ({args.dtype}, {args.device})", cases, ratios, repeats=args.repeats,
                         warmup=args.warmup, rounds=args.rounds, threads=args.threads, out_dir=args.out,
                         slug="gpu_sdxl")


if __name__ == "__main__":
    main()
