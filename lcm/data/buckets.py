"""Aspect-ratio buckets (SDXL, arXiv:2307.01952 §2.3): each image trains at the bucket nearest its aspect ratio, with
about resolution² pixels; a batch holds one bucket only, so its tensors stack.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch

from ..errors import DataError
from ..seeds import epoch_seed


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(h, w) buckets, multiples of `step`, with h·w ≤ resolution² and the widest side at most `max_aspect` × the other;
    for each height the widest such width (SDXL's table is this rule at 1024 with step 64)."""
    if step < 1 or max_aspect < 1:
        raise DataError(f"data.bucket_step must be >= 1 and data.bucket_max_aspect >= 1, got {step}, {max_aspect}")
    area, found = resolution * resolution, []
    for h in range(step, area // step + 1, step):
        w = area // h // step * step
        if w >= step and max(h, w) <= max_aspect * min(h, w):
            found.append((h, w))
    if not found:
        raise DataError(f"no bucket of multiples of data.bucket_step={step} fits data.resolution={resolution}")
    return found


def nearest_bucket(size_hw: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to that of `size_hw`; ties go to the first."""
    ratio = math.log(size_hw[0] / size_hw[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of one bucket each, in an order that depends only on (seed, epoch): shuffle each bucket, cut it into
    full batches (a bucket's remainder is dropped for the epoch), then shuffle the batches across buckets."""

    def __init__(self, buckets: Sequence[Any], batch_size: int, seed: int = 0):
        self.groups: dict[Any, list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(bucket, []).append(index)
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(g) // self.batch_size for g in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        batches = []
        for bucket in sorted(self.groups):  # sorted: the order never depends on dict insertion
            members = self.groups[bucket]
            shuffled = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
            batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled) - self.batch_size + 1,
                                                                        self.batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=gen).tolist())
