"""benchmarks/bench_cache.py builds real training steps (so it cannot rot between benchmark runs): the cached case
loads no VAE (the build asserts it), and both steps give a finite loss."""

import pytest
import torch

from benchmarks import bench_cache


@pytest.mark.parametrize("cache", [False, True])
def test_bench_cache_step_runs_on_the_second_tiny_size(cache):
    step = bench_cache.build("tiny-M", cache=cache, batch_size=2)
    assert all(torch.isfinite(step()) for _ in range(2))
