"""Every seed and generator of a run, derived from `train.seed` alone: the exactness contract.

A run's randomness is a pure function of (seed, what is being drawn for), never of the order things happened in the
process, the number of ranks or loader workers, the device, or whether the run was resumed:

- per rank: `rank_seed` = seed × world + rank (DiT), the one place a rank enters a seed;
- the batch order of epoch e: `epoch_seed(seed, e)` (the same on every rank; ranks then take disjoint slices);
- crops and flips: `item_seed(seed, epoch, index)` per indexed item, `key_seed(seed, epoch, key)` per streamed
  sample (its shard URL + key), so augmentations do not depend on workers, ranks or stream order;
- a training sample's VAE noise, ε, grid index and w: `sample_generators`, one CPU generator per sample keyed by its
  position in the run's sample stream (`sample_position`), so 2 ranks × B/2 reproduce 1 rank × B;
- what cannot take a generator (LoRA dropout): torch's global RNG reseeded per (rank, step, micro-batch) by
  `seed_global_rng_for_step` from `step_generator`, so its masks do not depend on what ran before (validation, a
  resume).

Together with the optimiser, LR schedule, EMA and counters restored from a checkpoint, this is what makes a resumed run
bit-identical to an uninterrupted one (tests/test_resume.py) and a 2-rank run equal to a 1-rank one
(tests/test_distributed.py). Changing any function here changes every run's numbers: the values are part of the
contract: `epoch_seed` / `item_seed` are numpy's `SeedSequence([...]).generate_state(1)[0]`, as they were before
this module existed (tests/test_seeds.py pins values).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch



def rank_seed(seed: int, rank: int, world_size: int) -> int:
    """The one per-rank seed (DiT's global_seed × world + rank): ranks differ, runs repeat."""
    return seed * world_size + rank


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser: scrambles an integer key so nearby keys give unrelated seeds."""
    x = (x + 0x9E3779B97F4A7C15) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def _seed_sequence_word(values: Sequence[int]) -> int:
    """The first 32-bit word of numpy's `SeedSequence(values)`: a well-mixed hash of several integers."""
    import numpy as np  # numpy comes with torch; imported here so that importing seeds stays cheap

    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed seed per (run seed, epoch) for the batch order; disjoint from the per-item seeds (3 words)."""
    return _seed_sequence_word([seed, epoch])


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed seed per (run seed, epoch, item), so augmentations never depend on worker count or order."""
    return _seed_sequence_word([seed, epoch, index])


def key_seed(seed: int, epoch: int, key: str) -> int:
    """A sample's augmentation seed from its identity (shard URL + key), so it never depends on ranks, workers or
    stream order."""
    return item_seed(seed, epoch, int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))


def seeded_order(items: Sequence[Any], seed: int) -> list[Any]:
    """`items` in a random order drawn from `seed` alone (torch's randperm, the same on every rank and worker)."""
    return [items[i] for i in torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()]


def step_generator(seed: int, rank: int, world_size: int, step: int, micro: int, device) -> torch.Generator:
    """A fresh generator per (rank, optimiser step, micro-batch): the noise of step s never depends on resuming."""
    g = torch.Generator(device=device)
    g.manual_seed((rank_seed(seed, rank, world_size) * 1_000_003 + step) * 64 + micro)
    return g


def seed_global_rng_for_step(gen: torch.Generator) -> None:
    """Reseed torch's global RNG from this micro-step's generator, for what cannot take a generator (LoRA dropout).

    Dropout draws from the global RNG, so without this its masks would depend on everything that ran before in the
    process (validation, a resume). The seed is scrambled so the masks are not the same stream as one drawn from
    `gen`'s integer seed.
    """
    torch.manual_seed(_splitmix64(gen.initial_seed()) % 2**63)


def sample_position(step: int, micro: int, rank: int, world_size: int, accumulation: int, batch_size: int) -> int:
    """Where this micro-batch's first sample sits in the run's stream of samples (counted over all ranks).

    accelerate shards a map-style loader by whole batches, round-robin over ranks, so rank r's micro-batch m of
    optimiser step s is batch (s·A + m)·W + r of the shuffled stream. The position is therefore the same for a sample
    whether the global batch of step s is one rank × W·b, W ranks × b, or one rank × b with W·A micro-batches.
    """
    return ((step * accumulation + micro) * world_size + rank) * batch_size


def sample_generators(seed: int, first: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample, keyed by (seed, stream position): a sample's VAE noise, ε, grid index and w do
    not depend on how the global batch is split over ranks and micro-batches, nor on the device (EDM's per-image
    generators). This is what lets 2 ranks × B/2 reproduce 1 rank × B (tests/test_distributed.py)."""
    return [torch.Generator().manual_seed(_splitmix64(seed * 2**40 + first + i) % 2**63) for i in range(n)]
