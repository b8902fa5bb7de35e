"""What the trainer consumes: the indexed dataset (`CaptionedImages`), `build_dataset` from a data config (indexed or
streamed), the collate function and `build_loader` (bucket batches, a plain seeded shuffle, or a stream's loader).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..seeds import item_seed
from .buckets import BucketBatchSampler, bucket_sizes, nearest_bucket
from .images import DataSummary, _describe, format_summary, load_image
from .sources import SOURCES
from .stream import StreamingImages, build_stream, is_streaming, stream_loader
from .transforms import cover_size, draw_crop_flip, sdxl_item

logger = logging.getLogger("lcm.data")  # one logger for the package: what users (and tests) filter on


class CaptionedImages(Dataset):
    """Indexed, pre-checked captioned images → SDXL training items, square or in aspect-ratio buckets."""

    def __init__(
        self,
        images: Sequence[Any],
        captions: Sequence[str],
        *,
        resolution: int,
        sizes: Sequence[tuple[int, int]] | None = None,
        bucket_table: Sequence[tuple[int, int]] | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        summary: DataSummary | None = None,
    ):
        assert len(images) == len(captions) > 0
        self.images, self.captions = images, list(captions)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.epoch = seed, 0
        self.summary = summary if summary is not None else DataSummary(n_ok=len(images))
        self._warned: set[int] = set()
        # Buckets need every image's (h, w) from the index; without them every item is a resolution² square.
        if bucket_table is not None and sizes is None:
            raise ValueError("aspect-ratio buckets need the image sizes from indexing")
        self.sizes = sizes
        self.buckets = None if bucket_table is None else [nearest_bucket(s, bucket_table) for s in sizes]

    def target_size(self, index: int) -> tuple[int, int]:
        """The (h, w) this item trains at: its bucket, or the square resolution."""
        return (self.resolution, self.resolution) if self.buckets is None else self.buckets[index]

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw per epoch (call before building the epoch's iterator; workers copy it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        # A file that passed the header check can still fail to decode (truncated data, changed on disk):
        # count it and move on deterministically to the next index of the same bucket (so the batch still stacks)
        # instead of killing the run.
        for j in (index + k for k in range(len(self))):
            j %= len(self)
            if self.target_size(j) != self.target_size(index):
                continue
            try:
                image = load_image(self.images[j])
            except Exception as err:  # any PIL failure on one file; the transform below is outside this guard
                self.summary.n_decode_errors += 1
                if j not in self._warned:
                    self._warned.add(j)
                    logger.warning("data: cannot decode item %d, %s (%s: %s); using the next one", j,
                                   _describe(self.images[j]), type(err).__name__, err)
                continue
            return self._make_item(image, j)
        raise RuntimeError("data: no image in the dataset could be decoded")

    def draw_transform(self, image_hw: tuple[int, int], index: int) -> tuple[tuple[int, int], int, int, bool]:
        """(target (h, w), crop top, crop left, flip) for item `index` this epoch, from its own seeded generator."""
        target = self.target_size(index)
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        top, left, flip = draw_crop_flip(cover_size(image_hw, target), target, center_crop=self.center_crop,
                                         random_flip=self.random_flip, generator=generator)
        return target, top, left, flip

    def _make_item(self, image: Image.Image, index: int) -> dict[str, Any]:
        """Transform one decoded image and attach its caption and SDXL conditioning."""
        target, top, left, flip = self.draw_transform((image.height, image.width), index)
        return {**sdxl_item(image, self.captions[index], target, top, left, flip),
                "index": index}  # the item actually loaded (differs from the request only after a decode fallback)


def collate_fn(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors into a batch (nested dicts too, e.g. cached text conditioning); captions stay a list of str."""
    return torch.utils.data.default_collate(items)


def build_loader(dataset: Dataset, collate, batch_size: int, seed: int, num_workers: int = 0, *, rank: int = 0,
                 world_size: int = 1, accumulation: int = 1):
    """(DataLoader, its bucket sampler or None). With buckets the batch sampler is ours; otherwise a plain shuffle
    (accelerate's seedable sampler then replaces it with one seeded by (seed, epoch)). A stream gets this rank's
    loader of whole batches (`stream_loader`; the rank and accumulation fix its epoch)."""
    if isinstance(dataset, StreamingImages):
        return stream_loader(dataset, collate, batch_size, num_workers, rank, world_size, accumulation), None
    buckets = getattr(dataset, "buckets", None)
    if buckets is not None:
        sampler = BucketBatchSampler(buckets, batch_size, seed)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                           num_workers=num_workers), sampler
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       collate_fn=collate, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(seed)), None


def build_dataset(cfg: Any, seed: int = 0) -> CaptionedImages | StreamingImages:
    """Index `cfg.source`, drop unusable files, log the summary once; raises ValueError if nothing is usable.
    Streaming webdataset sources (`is_streaming`) are not indexed: their samples are checked as they arrive."""
    if cfg.source not in SOURCES:
        raise DataError(f"unknown data.source {cfg.source!r}; choose one of {sorted(SOURCES)}")
    if cfg.resolution <= 0:
        raise DataError(f"data.resolution must be positive, got {cfg.resolution}")
    if is_streaming(cfg):
        return build_stream(cfg, seed)
    summary = DataSummary()
    images, captions, sizes = SOURCES[cfg.source](cfg, summary)
    if summary.n_ok == 0:
        raise DataError(f"no usable image in {str(cfg.path)!r}: {format_summary(summary)}")
    problems = (summary.n_skipped or summary.n_missing_caption or summary.n_caption_not_utf8
                or summary.bad_metadata_lines or summary.n_duplicate_rows or summary.n_symlinks_outside)
    logger.log(logging.WARNING if problems else logging.INFO, format_summary(summary))
    table = bucket_sizes(cfg.resolution, cfg.bucket_step, cfg.bucket_max_aspect) if cfg.buckets else None
    return CaptionedImages(
        images, captions, resolution=cfg.resolution, sizes=sizes, bucket_table=table, center_crop=cfg.center_crop,
        random_flip=cfg.random_flip, seed=seed, summary=summary,
    )
