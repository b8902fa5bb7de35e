"""Where one LCM-LoRA optimiser step spends its time, by role (issue #13 item 4): per-sample generators, VAE and text
encoders, student forward, teacher (2B rows, CFG), target, backward, optimiser (clip + AdamW + EMA), on the mini preset.

    python -m benchmarks.profile_step [--steps 6] [--batch-size 64] [--ops 15] [override ...]

The step is the training loop's (trainer.train via train_speed.build_preset_step). Each UNet call is timed by forward
hooks and labelled by its place in the step (lcd_loss calls student, then the teacher solver's evaluations, then the
target); the rest is timed around the calls. Medians over the timed steps after one warm-up step. `--ops N` adds
torch.profiler's N most expensive operators (self CPU time) over one more step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ops", type=int, default=0, help="also print the N top operators from torch.profiler")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from benchmarks.train_speed import build_preset_step

    parts = build_preset_step(batch_size=args.batch_size, overrides=args.overrides, expose=True)
    step, net, pipe = parts["step"], parts["net"], parts["pipe"]
    clock: dict[str, float] = defaultdict(float)
    calls: list[tuple[float, bool]] = []  # (seconds, grad enabled) per UNet call, in order
    starts: dict[str, float] = {}

    def pre(module, inputs):
        starts["unet"] = time.perf_counter()

    def post(module, inputs, output):
        calls.append((time.perf_counter() - starts["unet"], torch.is_grad_enabled()))

    def timed(name):
        def pre_(module, inputs):
            starts[name] = time.perf_counter()

        def post_(module, inputs, output):
            clock[name] += time.perf_counter() - starts[name]
        return pre_, post_

    net.register_forward_pre_hook(pre)
    net.register_forward_hook(post)
    # vae.encode does not go through vae.forward: hook its encoder. A latent-cache run (data.cache_dir) has neither.
    vae = getattr(pipe, "vae", None)
    for module in (getattr(vae, "encoder", None), getattr(pipe, "text_encoder", None),
                   getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            a, b = timed("VAE + text encoders")
            module.register_forward_pre_hook(a)
            module.register_forward_hook(b)

    def label_calls():
        # lcd_loss's order: the student (the only call with grad), the solver's teacher evaluations, the target last.
        no_grad = [secs for secs, grad in calls if not grad]
        clock["student forward"] += sum(secs for secs, grad in calls if grad)
        clock["teacher (2B rows)"] += sum(no_grad[:-1])
        clock["target"] += no_grad[-1]

    rows = []
    for i in range(args.steps + 1):
        clock.clear()
        calls.clear()
        total = step(clock)
        label_calls()
        if i:  # the first step warms up allocators and kernels
            rows.append({**clock, "total": total})
    names = [k for k in rows[0] if k != "total"]
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in [*names, "total"]}
    med["other (loss math, noise, solver arithmetic)"] = med["total"] - sum(med[k] for k in names)
    print(f"one optimiser step, batch {args.batch_size}, {torch.get_num_threads()} thread(s), median of {len(rows)}:")
    for k, v in sorted(med.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<46} {v * 1e3:9.1f} ms  {v / med['total']:6.1%}")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(defaultdict(float))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
    return {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "median_s": med}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2, default=float))
