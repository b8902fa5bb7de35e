"""Can the adversarial objectives' discriminator tell real digits from a student's samples at all? A probe by t̂.

    python -m benchmarks.d_probe_mini [--lora runs/mini/lcm-lora-s0/final] [--t-hats 20,100,300,500,730]

The discriminator is the one `distill.objective=lcd_adv | add` trains with the default frozen backbone: the mini
teacher's encoder features (adapters off) under fresh projection heads (lcm/discriminator.py). Here the heads alone
are trained for `--iters` hinge steps (Adam 1e-3, β = (0, 0.99), batch 64) on real latents (the digits folder through
the VAE's posterior mean) against the LoRA's `--steps`-step samples (LCMScheduler from the run's exported config,
guidance 1), both re-noised to one fixed t̂ per probe, then scored on held-out pairs: accuracy = mean of "real > 0"
and "fake < 0". 0.5 is chance. Every head shares one text conditioning ("a handwritten digit"), so the probe asks
about image realism only. The default t̂ law of `adversarial.*` (logit-normal, loc 1, scale 1) has its median at
t̂ ≈ 730. One process, `torch.get_num_threads()` threads (set OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.quality_mini import RESULTS, ROOT, commit, ensure_digits

MINI_TEACHER = ROOT / "lcm" / "assets" / "mini_teacher"
WORDS = "zero one two three four five six seven eight nine".split()


def real_latents(pipe, n: int) -> torch.Tensor:
    """The first n images of the digits folder as VAE posterior means (the UNet's latent units)."""
    import numpy as np
    from PIL import Image

    from lcm.encode import latent_moments

    files = sorted(ensure_digits().glob("*.png"))[:n]
    if len(files) < n:
        raise SystemExit(f"the digits folder has {len(files)} images, fewer than --n {n}")
    px = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                      for f in files])
    return latent_moments(pipe.vae, px)[0]


def student_latents(pipe, lora: Path, n: int, steps: int, seed: int = 10_000) -> torch.Tensor:
    """n latents of the LoRA at `steps` steps under the scheduler its run exported (LCMScheduler for an LCM-LoRA, DDIM
    trailing for a PCM one; one generator per image, digits in turn), LoRA unloaded after."""
    from lcm.sampling import saved_scheduler

    teacher_scheduler = pipe.scheduler
    pipe.load_lora_weights(str(lora))
    pipe.scheduler = saved_scheduler(lora)
    prompts = [f"a handwritten digit {WORDS[i % 10]}" for i in range(n)]
    out = []
    for i in range(0, n, 128):
        gens = [torch.Generator().manual_seed(seed + j) for j in range(i, min(i + 128, n))]
        out.append(pipe(prompts[i:i + len(gens)], num_inference_steps=steps, guidance_scale=1.0, height=16, width=16,
                        generator=gens, output_type="latent").images)
    pipe.unload_lora_weights()
    pipe.scheduler = teacher_scheduler
    return torch.cat(out)


def probe(unet, cond: dict, real: torch.Tensor, fake: torch.Tensor, t_hat: int, iters: int, schedule,
          seed: int = 1) -> dict:
    """Train fresh heads at a fixed t̂ on 3/4 of the pairs; hinge loss at the end and held-out accuracy."""
    from lcm.discriminator import build_heads, make_discriminator, teacher_features

    torch.manual_seed(seed)
    heads = build_heads(unet, hidden=64)
    d = make_discriminator(teacher_features(unet), heads)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3, betas=(0.0, 0.99))
    n_train = 3 * len(real) // 4

    def logits(x, idx):
        t = torch.full((len(x),), t_hat)
        return d(schedule.add_noise(x, torch.randn_like(x), t), t, {k: v[idx] for k, v in cond.items()}).mean(1)

    for _ in range(iters):
        idx = torch.randint(0, n_train, (64,))
        loss = torch.relu(1 - logits(real[idx], idx)).mean() + torch.relu(1 + logits(fake[idx], idx)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        idx = torch.arange(n_train, len(real))
        acc_real = (logits(real[idx], idx) > 0).float().mean().item()
        acc_fake = (logits(fake[idx], idx) < 0).float().mean().item()
    return {"t_hat": t_hat, "train_hinge": loss.item(), "acc_real": acc_real, "acc_fake": acc_fake,
            "acc": (acc_real + acc_fake) / 2}


def write_result(out: Path, result: dict, lines: list[str]) -> dict:
    """OUT.json (the result) and OUT.md (the lines), printed too; returns the result."""
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora", type=Path, default=ROOT / "runs" / "mini" / "lcm-lora-s0" / "final")
    p.add_argument("--steps", type=int, default=1, help="the student's sampling steps for the fakes")
    p.add_argument("--t-hats", default="20,100,300,500,730")
    p.add_argument("--iters", type=int, default=120)
    p.add_argument("--n", type=int, default=512, help="real and fake latents each (3/4 train, 1/4 held out)")
    p.add_argument("--out", type=Path, default=RESULTS / "d_probe_mini")
    args = p.parse_args(argv)
    from diffusers import StableDiffusionXLPipeline

    from lcm.encode import encode_text
    from lcm.schedule import NoiseSchedule

    if not (args.lora / "pytorch_lora_weights.safetensors").is_file():
        raise SystemExit(f"no LoRA at {args.lora}: train one first, e.g. python -m benchmarks.eval_all_mini "
                         "--train-only --rows LCM-LoRA --seeds 0")
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(MINI_TEACHER)
    pipe.set_progress_bar_config(disable=True)
    real = real_latents(pipe, args.n)
    time_ids = torch.tensor([[16, 16, 0, 0, 16, 16]] * args.n, dtype=torch.float32)
    cond, _ = encode_text(pipe, ["a handwritten digit"] * args.n, time_ids, "cpu")
    fake = student_latents(pipe, args.lora, args.n, args.steps)
    schedule = NoiseSchedule(pipe.scheduler.alphas_cumprod)
    rows = []
    for t_hat in (int(t) for t in args.t_hats.split(",")):
        rows.append(probe(pipe.unet, cond, real, fake, t_hat, args.iters, schedule))
        print(json.dumps(rows[-1]), flush=True)
    result = {"lora": str(args.lora), "steps": args.steps, "iters": args.iters, "n": args.n, "commit": commit(),
              "threads": torch.get_num_threads(), "latent_std": {"real": real.std().item(), "fake": fake.std().item()},
              "rows": rows}
    lines = [f"## Discriminator probe: real digits against `{args.lora.relative_to(ROOT) if args.lora.is_relative_to(ROOT) else args.lora}` at {args.steps} step(s)",
             "", f"`python -m benchmarks.d_probe_mini --steps {args.steps} --t-hats {args.t_hats} --iters {args.iters} "
             f"--n {args.n}`; commit {result['commit']}, {result['threads']} thread(s). Latent std: real "
             f"{result['latent_std']['real']:.3f}, fake {result['latent_std']['fake']:.3f}.", "",
             "| t̂ | hinge after training | held-out accuracy (real / fake) |", "|---|---|---|"]
    lines += [f"| {r['t_hat']} | {r['train_hinge']:.3f} | {r['acc']:.1%} ({r['acc_real']:.1%} / {r['acc_fake']:.1%}) |"
              for r in rows]
    return write_result(args.out, result, lines)


if __name__ == "__main__":
    main()
