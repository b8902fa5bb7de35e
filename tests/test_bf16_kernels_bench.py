"""benchmarks/bf16_kernels.py runs and reports every kernel in both precisions (its numbers are README's)."""

import json

from benchmarks import bf16_kernels


def test_bf16_kernels_bench_writes_every_kernel(tmp_path):
    result = bf16_kernels.main(["--repeats", "1", "--out", str(tmp_path / "k")])
    names = [r["kernel"] for r in result["rows"]]
    assert names == list(bf16_kernels.kernels(bf16_kernels.torch.float32))
    assert all(r["fp32_ms"] > 0 and r["bf16_ms"] > 0 for r in result["rows"])
    assert json.loads((tmp_path / "k.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "k.md").read_text().count("\n| ") == len(names) + 1  # header + one row per kernel
