"""Streaming webdataset shards: remote (`pipe:`, http(s)://, …) or gzip-compressed shards cannot be read by offset, so
they are read front to back through webdataset's tar streaming. What keeps this exact and distributable:
- the epoch has a declared length (`data.num_samples`, over all ranks); every rank yields the same number of batches
  (DDP needs that), each loader worker a fixed share; a worker whose shards run out starts over on them;
- the shard order of an epoch depends on (seed, epoch) only; ranks and then loader workers take disjoint slices;
- samples are header-checked as they arrive (the same check as indexing), shuffled in a buffer seeded from
  (rank_seed, epoch, worker), grouped into batches (per bucket with data.buckets), and only then decoded;
- so a resume replays the epoch's stream and drops the consumed batches *before decoding* them.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import DataError
from ..seeds import epoch_seed, item_seed, key_seed, rank_seed, seeded_order
from .buckets import bucket_sizes, nearest_bucket
from .images import WDS_IMAGE_EXTENSIONS, DataSummary, _admit, format_summary, load_image
from .sources import _caption_text, _decode_text
from .transforms import cover_size, draw_crop_flip, sdxl_item

logger = logging.getLogger("lcm.data")  # one logger for the package: what users (and tests) filter on


COMPRESSED_SHARDS = (".tar.gz", ".tgz")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, https:, file:, …; two letters at least, so C:\ is a path


def _stream_urls(spec: str) -> list[str]:
    """Shard URLs of a streaming `data.path`: every .tar/.tar.gz/.tgz of a local folder (sorted), else webdataset's
    own expansion (brace patterns, `::`-joined lists)."""
    from webdataset.shardlists import expand_urls

    folder = Path(spec)
    if not _SCHEME.match(spec) and folder.is_dir():
        return sorted(str(p) for p in folder.iterdir() if p.name.endswith((".tar", *COMPRESSED_SHARDS)))
    return expand_urls(spec)


def is_streaming(cfg: Any) -> bool:
    """Whether `cfg` (a data config) reads webdataset shards as a stream: forced by `data.streaming`, or implied by
    a URL / `pipe:` spec or compressed shards. Local uncompressed .tar shards keep the random-access index."""
    if cfg.source != "webdataset":
        return False
    spec = str(cfg.path)
    return bool(cfg.streaming or _SCHEME.match(spec) or any(u.endswith(COMPRESSED_SHARDS) for u in _stream_urls(spec)))


def _check_stream_urls(spec: str, urls: list[str]) -> None:
    """Fail before training on what can never be read: no shard, a local shard that is not there, a URL scheme
    webdataset has no reader for (s3:// needs `pipe:aws s3 cp s3://… -`)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from webdataset.gopen import gopen_schemes

    if not urls:
        raise DataError(f"no shards found for data.path {spec!r}")
    for url in urls:
        scheme = urlparse(url).scheme if _SCHEME.match(url) else ""
        if scheme in ("", "file"):
            path = Path(url2pathname(urlparse(url).path)) if scheme else Path(url)
            if not path.is_file():
                raise DataError(f"data.path {spec!r}: shard {str(path)} does not exist")
        elif scheme not in gopen_schemes:
            raise DataError(f"data.path {spec!r}: no reader for {scheme}:// URLs; stream them through a command, "
                             f"e.g. 'pipe:aws s3 cp {url} -' (readers: pipe:, file:, "
                             f"{', '.join(sorted(k + '://' for k in gopen_schemes if k not in ('__default__', 'pipe')))})")


@dataclass
class _Slot:
    """A sample that passed the header check, still encoded: its place in a batch is fixed before it is decoded."""

    key: str
    image: bytes
    caption: str
    size: tuple[int, int]  # upright (h, w) from the header
    target: tuple[int, int]


class StreamingImages:
    """Captioned images streamed from webdataset shards. `len` is the declared epoch length (`data.num_samples`,
    over all ranks); `stream_loader` turns it into one rank's loader of whole batches."""

    def __init__(self, urls: list[str], *, path: str, num_samples: int, resolution: int,
                 bucket_table: Sequence[tuple[int, int]] | None = None, center_crop: bool = True,
                 random_flip: bool = False, shuffle_buffer: int = 1000, seed: int = 0,
                 summary: DataSummary | None = None):
        self.urls, self.path, self.num_samples = list(urls), path, num_samples
        self.resolution, self.bucket_table = resolution, bucket_table
        self.center_crop, self.random_flip, self.shuffle_buffer = center_crop, random_flip, shuffle_buffer
        self.seed, self.epoch = seed, 0
        self.summary = summary if summary is not None else DataSummary()

    def __len__(self) -> int:
        return self.num_samples

    def describe(self) -> str:
        """The one-line data summary for the log and the model card (counts come per epoch, from the workers)."""
        return f"data: streamed from {len(self.urls)} shard(s) of {self.path}, {self.num_samples} samples per epoch"

    def set_epoch(self, epoch: int) -> None:
        """The shard order, shuffle buffer and augmentations of the next iteration (workers copy it at iter())."""
        self.epoch = epoch

    def shards(self, rank: int, world_size: int, worker: int = 0, num_workers: int = 1) -> list[str]:
        """This rank's and worker's shards in this epoch: one (seed, epoch) shuffle shared by all ranks, then
        disjoint slices, ranks first (webdataset's split_by_node, then split_by_worker)."""
        return seeded_order(self.urls, epoch_seed(self.seed, self.epoch))[rank::world_size][worker::num_workers]

    def _on_error(self, err: Exception) -> bool:
        """webdataset handler: a shard that cannot be opened or read is skipped with a warning and counted.
        (webdataset's warn_and_continue also sleeps half a second per error and counts nothing.)"""
        self.summary.skip("unreadable_shard")
        logger.warning("data: skipping the rest of a shard of %s (%s: %s)", self.path, type(err).__name__, err)
        return True

    def _read(self, shards: list[str]) -> Iterator[_Slot]:
        """Header-checked samples of `shards`, read front to back through webdataset; the rest are counted."""
        from webdataset.tariterators import tarfile_samples

        for sample in tarfile_samples(({"url": url} for url in shards), handler=self._on_error):
            ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                self.summary.skip("no_image")
                continue
            raw = sample.get("txt")
            caption = "" if raw is None else _caption_text(_decode_text(raw, self.summary))
            size = _admit(sample[ext], caption, self.summary, self.resolution)
            if size is None:
                continue
            self.summary.n_ok += 1
            target = (self.resolution, self.resolution) if self.bucket_table is None else \
                nearest_bucket(size, self.bucket_table)
            yield _Slot(f"{sample['__url__']}/{sample['__key__']}", sample[ext], caption, size, target)

    def _slots(self, shards: list[str], seed: int) -> Iterator[_Slot]:
        """`_read` pass after pass (each pass takes the shards in a new order), shuffled in a buffer that drains at the
        end of each pass, so a pass holds every usable sample once."""
        from webdataset.filters import shuffle

        for npass in itertools.count():
            pass_seed = epoch_seed(seed, npass)
            slots = self._read(shards if npass == 0 else seeded_order(shards, pass_seed))
            if self.shuffle_buffer > 1:
                slots = shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=pass_seed)(slots)
            found = 0
            for found, slot in enumerate(slots, start=1):
                yield slot
            if not found:
                raise DataError(f"data.path {self.path!r}: no usable sample in shard(s) {', '.join(shards)} "
                                 f"({format_summary(self.summary)})")

    def batches(self, rank: int, world_size: int, worker: int, num_workers: int, batch_size: int, n_batches: int,
                skip: int = 0) -> Iterator[list[dict[str, Any]]]:
        """Worker `worker`'s share of this rank's `n_batches` batches of the epoch (batches j ≡ worker mod
        num_workers, the order DataLoader collects them in), after dropping the first `skip` rank batches undecoded."""
        quota = len(range(worker, n_batches, num_workers)) - len(range(worker, skip, num_workers))
        skip = len(range(worker, skip, num_workers))  # this worker's share of the consumed batches
        if quota <= 0:
            return
        shards = self.shards(rank, world_size, worker, num_workers)
        slots = self._slots(shards, item_seed(rank_seed(self.seed, rank, world_size), self.epoch, worker))
        made = given = 0
        open_batches: dict[tuple[int, int], list[_Slot]] = {}
        for slot in slots:  # one open batch per bucket (a single one without buckets); full ones go out in order
            group = open_batches.setdefault(slot.target, [])
            group.append(slot)
            if len(group) < batch_size:
                continue
            del open_batches[slot.target]
            made += 1
            if made <= skip:
                continue  # a resume: this batch was consumed before the checkpoint
            batch = self._decode(group)
            if batch is not None:
                yield batch
                given += 1
            if given == quota:
                break
        logger.info("data stream (epoch %d, rank %d, worker %d): %s", self.epoch, rank, worker,
                    format_summary(self.summary))

    def _decode(self, group: list[_Slot]) -> list[dict[str, Any]] | None:
        """Decode and transform one batch. A sample that passed the header check but fails to decode is replaced by
        the next decodable one of its batch (so the batch keeps its size and its place in the stream is exact); a
        batch none of whose samples decode is dropped."""
        items: list[dict[str, Any] | None] = []
        for slot in group:
            try:
                image = load_image(slot.image)
            except Exception as err:  # any PIL failure on one file; counted, then replaced below
                self.summary.n_decode_errors += 1
                logger.warning("data: cannot decode %s (%s: %s); using another sample of its batch", slot.key,
                               type(err).__name__, err)
                items.append(None)
                continue
            generator = torch.Generator().manual_seed(key_seed(self.seed, self.epoch, slot.key))
            top, left, flip = draw_crop_flip(cover_size(slot.size, slot.target), slot.target,
                                             center_crop=self.center_crop, random_flip=self.random_flip,
                                             generator=generator)
            items.append({**sdxl_item(image, slot.caption, slot.target, top, left, flip), "key": slot.key})
        good = [i for i, item in enumerate(items) if item is not None]
        if not good:
            return None
        return [item if item is not None else items[next((g for g in good if g > i), good[0])]
                for i, item in enumerate(items)]


class StreamEpoch(torch.utils.data.IterableDataset):
    """One rank's epoch of a `StreamingImages`: exactly `len` whole batches (lists of items), split over DataLoader
    workers. Set `skip` before iterating to resume mid-epoch."""

    def __init__(self, stream: StreamingImages, batch_size: int, n_batches: int, rank: int, world_size: int):
        self.stream, self.batch_size, self.n_batches = stream, batch_size, n_batches
        self.rank, self.world_size, self.skip = rank, world_size, 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.stream.batches(self.rank, self.world_size, worker, num_workers, self.batch_size, self.n_batches,
                                   self.skip)


def stream_loader(stream: StreamingImages, collate, batch_size: int, num_workers: int, rank: int, world_size: int,
                  accumulation: int) -> torch.utils.data.DataLoader:
    """A rank's DataLoader over a stream: the epoch is whole accumulation windows, num_samples // (world × batch ×
    accumulation) optimiser steps, the same on every rank."""
    steps = stream.num_samples // (world_size * batch_size * accumulation)
    if steps == 0:
        raise DataError(f"data.num_samples={stream.num_samples} is less than one optimiser step's global batch "
                         f"({world_size} process(es) × train.batch_size={batch_size} × accumulation {accumulation})")
    readers = world_size * max(1, num_workers)
    if len(stream.urls) < readers:
        raise DataError(f"data.path {stream.path!r} has {len(stream.urls)} shard(s), fewer than the {readers} "
                         f"readers ({world_size} process(es) × data.num_workers={num_workers}): each reads whole "
                         f"shards, so use more (smaller) shards or fewer data.num_workers")
    epoch = StreamEpoch(stream, batch_size, steps * accumulation, rank, world_size)
    return torch.utils.data.DataLoader(epoch, batch_size=None, collate_fn=collate, num_workers=num_workers)


def build_stream(cfg: Any, seed: int = 0) -> StreamingImages:
    """A streaming webdataset source from a data config; refuses what a stream cannot do, naming the key."""
    if cfg.num_samples is None:
        raise DataError(f"data.num_samples is required to stream {cfg.path!r}: a stream has no length, and the "
                         "epoch (shard reshuffle, resume replay) is that many samples over all ranks; set it to about "
                         "the number of samples in the shards")
    if cfg.max_samples is not None:
        raise DataError("data.max_samples applies to indexed sources; a stream's epoch is data.num_samples")
    urls = _stream_urls(str(cfg.path))
    _check_stream_urls(str(cfg.path), urls)
    table = bucket_sizes(cfg.resolution, cfg.bucket_step, cfg.bucket_max_aspect) if cfg.buckets else None
    return StreamingImages(urls, path=str(cfg.path), num_samples=cfg.num_samples, resolution=cfg.resolution,
                           bucket_table=table, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                           shuffle_buffer=cfg.shuffle_buffer, seed=seed)
