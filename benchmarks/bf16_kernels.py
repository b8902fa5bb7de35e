"""Single CPU kernels in fp32 and bf16, on one thread: why `train.mixed_precision=bf16` needs lcm/cpu_lowp.py here.

    OMP_NUM_THREADS=1 python -m benchmarks.bf16_kernels [--repeats 10]

A 128-channel 3×3 convolution and an 8192×512 · 512×512 product (what bf16 speeds up), torch's flash attention
forward + backward at the mini teacher's self-attention shape (64 × 4 heads × 16 tokens × 32) and the same under
the math backend, and group norm at a mini-teacher activation (128 × 128 × 8 × 8, 32 groups). Median ms of
`--repeats` calls after one warm-up. Writes benchmarks/results/bf16_kernels.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.d_probe_mini import write_result
from benchmarks.harness import time_calls
from benchmarks.quality_mini import RESULTS, commit


def median_ms(fn, repeats: int) -> float:
    return 1e3 * statistics.median(time_calls(fn, warmup=1, repeats=repeats))


def kernels(dtype: torch.dtype) -> dict:
    """name → a call of that kernel on seeded inputs in `dtype`."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    x, w = rand(128, 128, 16, 16), rand(128, 128, 3, 3)
    a, b = rand(8192, 512), rand(512, 512)
    q, k, v = (rand(64, 4, 16, 32, grad=True) for _ in range(3))
    h, gamma, beta = rand(128, 128, 8, 8), rand(128), rand(128)

    def attention(backend):
        def call():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v).sum().backward()
        return call

    return {"conv 3×3, 128 ch, 16×16": lambda: F.conv2d(x, w, padding=1),
            "matmul 8192×512 · 512×512": lambda: a @ b,
            "attention fwd + bwd, flash": attention(SDPBackend.FLASH_ATTENTION),
            "attention fwd + bwd, math": attention(SDPBackend.MATH),
            "group norm, 32 groups": lambda: F.group_norm(h, 32, gamma, beta)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS / "bf16_kernels")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fp32 = {name: median_ms(fn, args.repeats) for name, fn in kernels(torch.float32).items()}
    bf16 = {name: median_ms(fn, args.repeats) for name, fn in kernels(torch.bfloat16).items()}
    rows = [{"kernel": n, "fp32_ms": fp32[n], "bf16_ms": bf16[n], "fp32_over_bf16": fp32[n] / bf16[n]} for n in fp32]
    result = {"commit": commit(), "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
              "bf16_supported": torch.ops.mkldnn._is_mkldnn_bf16_supported(), "repeats": args.repeats, "rows": rows}
    lines = ["## CPU kernels, fp32 against bf16, one thread", "",
             f"`OMP_NUM_THREADS=1 python -m benchmarks.bf16_kernels --repeats {args.repeats}`; commit {result['commit']}, "
             f"torch {result['torch']}, CPU capability {result['cpu']}, oneDNN bf16 {result['bf16_supported']}. "
             "Median ms.", "", "| kernel | fp32 ms | bf16 ms | fp32 / bf16 |", "|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['fp32_ms']:.2f} | {r['bf16_ms']:.2f} | {r['fp32_over_bf16']:.2f} |" for r in rows]
    return write_result(args.out, result, lines)


if __name__ == "__main__":
    main()
