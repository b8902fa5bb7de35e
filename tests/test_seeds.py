"""lcm.seeds: the seed functions are exact, pure functions of their arguments."""

import random

import numpy as np
import pytest
import torch

from lcm.seeds import epoch_seed, item_seed, key_seed, sample_generators, sample_position, seeded_order


def _numpy_seed(*values):
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


def test_epoch_and_item_seeds_equal_numpys_seed_sequence():
    # The contract: these values fixed every run's shuffle and augmentations when they were computed with numpy.
    rng = random.Random(0)
    pick = lambda: rng.choice([0, 1, rng.randrange(100), rng.randrange(2**32), rng.randrange(2**64)])  # noqa: E731
    for _ in range(2000):
        seed, epoch, index = pick(), pick(), pick()
        assert epoch_seed(seed, epoch) == _numpy_seed(seed, epoch)
        assert item_seed(seed, epoch, index) == _numpy_seed(seed, epoch, index)
    with pytest.raises(ValueError):
        epoch_seed(-1, 0)


def test_key_seed_depends_on_the_key_not_on_order():
    keys = [f"shard-{i}.tar/{j:04d}" for i in range(3) for j in range(50)]
    seeds = [key_seed(7, 2, k) for k in keys]
    assert len(set(seeds)) == len(keys)
    assert [key_seed(7, 2, k) for k in reversed(keys)] == seeds[::-1]
    assert key_seed(7, 3, keys[0]) != seeds[0] and key_seed(8, 2, keys[0]) != seeds[0]


def test_seeded_order_is_a_repeatable_permutation():
    items = list(range(20))
    assert sorted(seeded_order(items, 5)) == items
    assert seeded_order(items, 5) == seeded_order(items, 5) != seeded_order(items, 6)


def test_a_samples_generator_does_not_depend_on_how_the_batch_is_split():
    # 1 rank × batch 4 vs 2 ranks × batch 2: the same four stream positions, so the same four generators' draws.
    one = sample_generators(3, sample_position(1, 0, 0, 1, 1, 4), 4)
    two = [g for rank in (0, 1) for g in sample_generators(3, sample_position(1, 0, rank, 2, 1, 2), 2)]
    assert all(torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b)) for a, b in zip(one, two))
