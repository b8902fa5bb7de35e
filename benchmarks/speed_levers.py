"""The speed levers of issue #13 item 4, each timed on one mini-preset step's own UNet inputs (batch 64, rank 32):
PEFT's LoRA forward against the fused one (student forward + backward, target), channels_last on the teacher's 2B
rows, and optionally torch.compile of the teacher's forward (its compile time included).

    python -m benchmarks.speed_levers [--repeats 5] [--compile]

The inputs are captured from a real `train_speed.build_preset_step` step, so shapes and conditioning are the
training loop's. Random adapter B matrices stand in for trained ones (zero B would make LoRA free in neither path).
Medians of `--repeats` runs after a warm-up, cases alternated over two rounds; one process, `torch.get_num_threads()`
threads (set OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.harness import time_calls


def _median_s(fn, repeats: int) -> float:
    return statistics.median(time_calls(fn, warmup=1, repeats=repeats))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also torch.compile the teacher forward (minutes)")
    args = p.parse_args(argv)
    from benchmarks.train_speed import build_preset_step
    from lcm import fused_lora
    from lcm.roles import adapters_disabled

    parts = build_preset_step(expose=True, overrides=["lora.fused_forward=false"])
    net, calls = parts["net"], []
    hook = net.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    parts["step"]()
    hook.remove()
    (student_in, teacher_in, target_in) = calls[:3]  # lcd_loss's order with the DDIM solver
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)

    def student():
        net(*student_in[0], **student_in[1]).sample.square().mean().backward()

    @torch.no_grad()
    def target():
        net(*target_in[0], **target_in[1])

    @torch.no_grad()
    def teacher():
        with adapters_disabled(net):
            net(*teacher_in[0], **teacher_in[1])

    times: dict[str, list[float]] = {}
    for _ in range(2):
        times.setdefault("student fwd+bwd, PEFT forward", []).append(_median_s(student, args.repeats))
        times.setdefault("target, PEFT forward", []).append(_median_s(target, args.repeats))
        with fused_lora.fused(net):
            times.setdefault("student fwd+bwd, fused forward", []).append(_median_s(student, args.repeats))
            times.setdefault("target, fused forward", []).append(_median_s(target, args.repeats))
        times.setdefault("teacher 2B rows, NCHW", []).append(_median_s(teacher, args.repeats))
        net.to(memory_format=torch.channels_last)
        x = teacher_in[0][0]
        teacher_in = ((x.contiguous(memory_format=torch.channels_last), *teacher_in[0][1:]), teacher_in[1])
        times.setdefault("teacher 2B rows, channels_last", []).append(_median_s(teacher, args.repeats))
        net.to(memory_format=torch.contiguous_format)
        teacher_in = ((x, *teacher_in[0][1:]), teacher_in[1])
    result = {k: statistics.median(v) for k, v in times.items()}
    if args.compile:
        from diffusers import UNet2DConditionModel

        from benchmarks.train_speed import MINI_TEACHER

        base = UNet2DConditionModel.from_pretrained(MINI_TEACHER, subfolder="unet").eval().requires_grad_(False)
        compiled = torch.compile(base)
        with torch.no_grad():
            result["teacher 2B rows, plain UNet eager"] = _median_s(lambda: base(*teacher_in[0], **teacher_in[1]),
                                                                     args.repeats)
            start = time.perf_counter()
            compiled(*teacher_in[0], **teacher_in[1])
            result["torch.compile, first call (compile)"] = time.perf_counter() - start
            result["teacher 2B rows, plain UNet compiled"] = _median_s(
                lambda: compiled(*teacher_in[0], **teacher_in[1]), args.repeats)
    print(f"{torch.get_num_threads()} thread(s), median s of {args.repeats} runs × 2 rounds:")
    for k, v in result.items():
        print(f"  {k:<42} {v * 1e3:9.1f} ms")
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
