"""Is the adversarial term's discriminator the bottleneck? A small CNN trained from scratch on the latents themselves
against the frozen-teacher-feature heads the adversarial objectives use (`benchmarks/d_probe_mini.py`'s probe), on
the same real latents and the same student samples, at the same fixed t̂ values; and the CNN on the decoded pixels.

    python -m benchmarks.d_probe_latent_mini --lora runs/mini/pcm4-adv-endtr-s1/final --steps 4

The fakes come from the run's own exported scheduler (`d_probe_mini.student_latents`: DDIM trailing for a PCM run,
LCMScheduler for an LCM one) at `--steps`, guidance 1. A control row trains the CNN on real against other real
latents, which must stay at chance. Accuracy is on held-out pairs (the last quarter), 0.5 = chance. One process,
`torch.get_num_threads()` threads (set OMP_NUM_THREADS). Issue #17: every `pcm_adv` run's D sat at hinge 2.0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from benchmarks.d_probe_mini import MINI_TEACHER, probe, real_latents, student_latents, write_result
from benchmarks.quality_mini import RESULTS, ROOT, commit


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the UNet's units → the VAE's pixels in [-1, 1] (what the digit classifier behind FD sees)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return torch.cat([vae.decode(z / vae.config.scaling_factor + shift).sample.clamp(-1, 1)
                      for z in latents.split(128)])


def cnn_probe(real: torch.Tensor, fake: torch.Tensor, t_hat: int, iters: int, schedule, seed: int = 1) -> dict:
    """A fresh 3-layer CNN on (re-noised) latents, hinge loss, Adam 1e-3; held-out accuracy on the last quarter."""
    torch.manual_seed(seed)
    c = real.shape[1]
    d = nn.Sequential(nn.Conv2d(c, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU(),
                      nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(128, 1))
    opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.0, 0.99))
    n_train = 3 * len(real) // 4

    def logits(x):
        if t_hat == 0:
            return d(x).squeeze(1)
        t = torch.full((len(x),), t_hat)
        return d(schedule.add_noise(x, torch.randn_like(x), t)).squeeze(1)

    for _ in range(iters):
        idx = torch.randint(0, n_train, (64,))
        loss = torch.relu(1 - logits(real[idx])).mean() + torch.relu(1 + logits(fake[idx])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held = torch.arange(n_train, len(real))
        acc_real = (logits(real[held]) > 0).float().mean().item()
        acc_fake = (logits(fake[held]) < 0).float().mean().item()
    return {"t_hat": t_hat, "train_hinge": loss.item(), "acc_real": acc_real, "acc_fake": acc_fake,
            "acc": (acc_real + acc_fake) / 2}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora", type=Path, required=True, help="a run's final/ folder")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--t-hats", default="0,20,100,300")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--n", type=int, default=640, help="real and fake latents each (3/4 train, 1/4 held out)")
    p.add_argument("--out", type=Path, default=RESULTS / "d_probe_latent_mini")
    args = p.parse_args(argv)
    from diffusers import StableDiffusionXLPipeline

    from lcm.encode import encode_text
    from lcm.schedule import NoiseSchedule

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(MINI_TEACHER)
    pipe.set_progress_bar_config(disable=True)
    real = real_latents(pipe, 2 * args.n)
    real, other = real[:args.n], real[args.n:]
    fake = student_latents(pipe, args.lora, args.n, args.steps)
    schedule = NoiseSchedule(pipe.scheduler.alphas_cumprod)
    time_ids = torch.tensor([[16, 16, 0, 0, 16, 16]] * args.n, dtype=torch.float32)
    cond, _ = encode_text(pipe, ["a handwritten digit"] * args.n, time_ids, "cpu")
    rows = []
    for t_hat in (int(t) for t in args.t_hats.split(",")):
        row = {"t_hat": t_hat, "cnn": cnn_probe(real, fake, t_hat, args.iters, schedule),
               "cnn_real_vs_real": cnn_probe(real, other, t_hat, args.iters, schedule)}
        if t_hat > 0:  # the frozen-feature heads take a noised input at t̂ ≥ 1
            row["frozen_heads"] = probe(pipe.unet, cond, real, fake, t_hat, args.iters, schedule)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the same CNN on decoded pixels (real latents decoded too, so VAE artefacts are on both sides)
    real_px, other_px, fake_px = decode(pipe, real), decode(pipe, other), decode(pipe, fake)
    pixels = {"t_hat": "0, decoded pixels", "cnn": cnn_probe(real_px, fake_px, 0, args.iters, schedule),
              "cnn_real_vs_real": cnn_probe(real_px, other_px, 0, args.iters, schedule)}
    rows.append(pixels)
    print(json.dumps(pixels), flush=True)
    result = {"lora": str(args.lora), "steps": args.steps, "iters": args.iters, "n": args.n, "commit": commit(),
              "threads": torch.get_num_threads(), "rows": rows}
    name = args.lora.relative_to(ROOT) if args.lora.is_relative_to(ROOT) else args.lora
    lines = [f"## Discriminator probe on `{name}` at {args.steps} steps: a CNN on the latents against the frozen "
             "teacher-feature heads", "",
             f"`python -m benchmarks.d_probe_latent_mini --lora {name} --steps {args.steps} --t-hats {args.t_hats} "
             f"--iters {args.iters} --n {args.n}`; commit {result['commit']}, {result['threads']} thread(s). Held-out "
             "accuracy (real / fake); 50% is chance.", "",
             "| t̂ | CNN on latents, real vs fake | CNN, real vs other real (control) | frozen-feature heads, real vs fake |",
             "|---|---|---|---|"]

    def cell(r):
        return f"{r['acc']:.1%} ({r['acc_real']:.1%} / {r['acc_fake']:.1%})" if r else "—"

    lines += [f"| {r['t_hat']} | {cell(r['cnn'])} | {cell(r['cnn_real_vs_real'])} | {cell(r.get('frozen_heads'))} |"
              for r in rows]
    return write_result(args.out, result, lines)


if __name__ == "__main__":
    main()
