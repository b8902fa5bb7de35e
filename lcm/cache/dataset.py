"""Training from the cache: `CachedDataset` hands out what the uncached loader would, read from the shards.

Augmentation: random crops cannot be cached (a new crop per epoch), so caching needs `data.center_crop=true`;
with `data.random_flip=true` both flips are cached and training picks one per (seed, epoch, item) with the same coin
as the uncached loader. Buckets are cached at each image's bucket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data import DataSummary, cover_size, draw_crop_flip
from ..seeds import item_seed
from .format import _Shards, check_cache_matches, read_manifest


class CachedDataset(Dataset):
    """Training items from a latent cache: (μ, σ, cond, uncond) + the item's size conditioning; no image decoding."""

    def __init__(self, cfg, seed: int = 0):
        root = Path(cfg.data.cache_dir)
        manifest = read_manifest(root)
        check_cache_matches(manifest, cfg, root)
        self.items, self.seed, self.epoch = manifest["items"], seed, 0
        self.random_flip = cfg.data.random_flip
        self.shards = _Shards(root, manifest["records"])
        self.uncond_ref = manifest["uncond_ref"]
        self.summary = DataSummary(**manifest["summary"])
        self.buckets = [tuple(v[0]["target_size"]) for v in self.items] if cfg.data.buckets else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        variants = self.items[index]
        variant = variants[self._flip(variants[0], index)]
        latent, text = self.shards.read(variant["latent"]), self.shards.read(variant["text"])
        shared = self.shards.read(self.uncond_ref)
        parts = {"cond": {}, "uncond": {}}
        for name, tensor in {**shared, **text}.items():  # the item's own tensors win over the shared ones
            part, _, key = name.partition(".")
            parts[part][key] = tensor
        return {"latent_mean": latent["mean"], "latent_std": latent["std"], **parts, "caption": variant["caption"],
                **{k: torch.tensor(variant[k]) for k in ("original_size", "crop_top_left", "target_size")},
                "index": index}

    def _flip(self, variant: dict, index: int) -> int:
        """The coin the uncached loader would toss for this (seed, epoch, item): 1 = the flipped variant."""
        if not self.random_flip:
            return 0
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        target = tuple(variant["target_size"])
        resized = cover_size(tuple(variant["original_size"]), target)
        return int(draw_crop_flip(resized, target, center_crop=True, random_flip=True, generator=generator)[2])
