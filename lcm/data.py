"""Training data: captioned images → SDXL items (pixels in [-1, 1] + size/crop micro-conditioning).

Sources: an image folder (captions from same-stem `.txt` files or a root `metadata.jsonl` / `metadata.csv`), an
HF `datasets` dataset (saved with `save_to_disk`, an image folder read by `imagefolder`, or a hub name), or webdataset
tar shards (`key.jpg`/`key.png` + `key.txt`; a folder of .tar files or a brace pattern, read by member offset; URLs,
`pipe:` commands and .tar.gz shards are streamed instead, see `StreamingImages`).
Bad files never stop a run: a cheap header check drops them at index time, and `__getitem__` falls back to another
image if a file still fails to decode later. Every count ends up in one `DataSummary`, logged once.

What happens to each kind of bad input (all counted in the summary):
- zero-byte file → skipped (`empty_file`); not an image, truncated header, broken PNG chunks → skipped (`unreadable`);
- more pixels than PIL's `Image.MAX_IMAGE_PIXELS` (a decompression bomb; PIL itself only *warns* up to twice the
  limit), or an aspect ratio so extreme that resizing its short side to `resolution` would pass that limit →
  skipped (`too_large`), decided from the header alone, never decoded;
- a file that passes the header check but fails to decode later (a JPEG truncated mid-scan) → the next image is used
  instead, deterministically, and `decode errors` counts it;
- CMYK, 16-bit, palette, grey, transparency (composited on white) → converted to RGB; EXIF rotation applied;
- smaller than `resolution` → kept and upscaled (shorter side to `resolution`, Lanczos) and counted as upscaled;
  `original_size` tells SDXL the true size, as SDXL's own training did for small images;
- no caption → kept with the empty caption (trains the unconditional case) and counted;
- a caption file that is not UTF-8 → decoded with U+FFFD for the bad bytes (one bad byte should not cost an image),
  counted; a UTF-8 byte-order mark is dropped;
- a `metadata.jsonl` / `.csv` line that does not parse or has no `file_name` → that line is skipped, and the summary
  names its line number; its image then falls back to a `.txt` caption or none;
- a GIF (listed or not) or another existing file a metadata row names with a non-image extension → skipped
  (`unsupported_format`; GIFs are not read: convert them to PNG); a row naming an absent file → `missing_file`;
- two metadata rows for one file (`a.png` and `./a.png` are the same) → the last row wins; counted, with the winning
  line named in the summary and the log;
- a file symlink pointing outside the folder → followed and counted, or skipped (`symlink_outside`) with
  `data.follow_symlinks=false`;
- an empty folder, or one with no usable image → `DataError` (a `ValueError`) from `build_dataset`, before any model
  is loaded.

SDXL micro-conditioning (Podell et al. 2023, arXiv:2307.01952 §2.2) is in **(height, width)** order throughout:
`original_size` = (h, w) as loaded, `crop_top_left` = (top, left) in the resized image, `target_size` = (res, res),
or with `data.buckets` the (h, w) of the aspect-ratio bucket nearest the image's (batches then hold one bucket each).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset

from .errors import DataError
from .seeds import epoch_seed, item_seed, key_seed, rank_seed, seeded_order

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Image formats a folder may hold that are not read (GIF: animated, palette-limited; convert to PNG to use them):
# counted as `unsupported_format`, as is any other existing file a metadata row names with a non-image extension.
UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".svg", ".ico")
WDS_IMAGE_EXTENSIONS = tuple(e[1:] for e in IMAGE_EXTENSIONS)  # webdataset keys are extensions without the dot
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_HF_SCAN_BATCH = 256  # rows read at a time during the HF header scan; keeps memory flat on large datasets


# ----------------------------------------------------------------------------------------------------------------------
# Summary


@dataclass
class DataSummary:
    """What indexing and loading kept, skipped (by reason) and found without a caption."""

    n_ok: int = 0
    n_skipped: dict[str, int] = field(default_factory=dict)  # reason → count: empty_file, unreadable, too_large, …
    n_missing_caption: int = 0
    n_decode_errors: int = 0  # failures in __getitem__ after indexing; counted per process (each worker has a copy)
    n_upscaled: int = 0  # kept images whose shorter side is below the training resolution
    n_caption_not_utf8: int = 0  # caption sources (.txt files, metadata lines/files) decoded with replacement
    bad_metadata_lines: list[int] = field(default_factory=list)  # 1-based line numbers skipped in the metadata file
    # Metadata rows naming a file an earlier row already named (`a.png`, `./a.png`): the last row wins. Normalised
    # file name → the line number whose caption won; the count is the number of rows overridden.
    n_duplicate_rows: int = 0
    duplicate_winners: dict[str, int] = field(default_factory=dict)
    n_symlinks_outside: int = 0  # file symlinks pointing outside the folder that were followed (refused: skipped)

    def skip(self, reason: str, n: int = 1) -> None:
        """Count `n` files dropped for `reason`."""
        if n:
            self.n_skipped[reason] = self.n_skipped.get(reason, 0) + n


def format_summary(summary: DataSummary) -> str:
    """One line for the log: kept, skipped by reason, missing captions, decode errors."""
    skipped = sum(summary.n_skipped.values())
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary.n_skipped.items()))
    line = f"data: {summary.n_ok} images ok, {skipped} skipped" + (f" ({reasons})" if reasons else "")
    line += f", {summary.n_missing_caption} without caption"
    if summary.n_upscaled:
        line += f", {summary.n_upscaled} upscaled (smaller than the training resolution)"
    if summary.n_caption_not_utf8:
        line += f", {summary.n_caption_not_utf8} caption(s) not UTF-8 (bad bytes replaced)"
    if summary.bad_metadata_lines:
        shown = summary.bad_metadata_lines[:10]
        more = "" if len(summary.bad_metadata_lines) <= len(shown) else ", …"
        line += (f", {len(summary.bad_metadata_lines)} bad metadata line(s) skipped "
                 f"(line {', '.join(map(str, shown))}{more})")
    if summary.n_duplicate_rows:
        won = list(summary.duplicate_winners.items())
        shown = ", ".join(f"{name} from line {number}" for name, number in won[:5]) + (", …" if len(won) > 5 else "")
        line += f", {summary.n_duplicate_rows} duplicate metadata row(s) overridden (the last row wins: {shown})"
    if summary.n_symlinks_outside:
        line += (f", {summary.n_symlinks_outside} symlink(s) to files outside the folder followed "
                 "(data.follow_symlinks=false skips them)")
    if summary.n_decode_errors:
        line += f", {summary.n_decode_errors} decode errors while loading"
    return line


# ----------------------------------------------------------------------------------------------------------------------
# Reading images. A "ref" is a path, raw bytes, or an HF Image dict {"bytes": ..., "path": ...} (decode=False).


@dataclass(frozen=True)
class TarMember:
    """One file inside an uncompressed tar shard, read by offset (random access without unpacking)."""

    shard: str
    name: str
    offset: int  # of the member's data
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.shard}: member {self.name} is truncated ({len(data)} of {self.size} bytes)")
        return data


def read_bytes(ref: Any) -> bytes:
    """The encoded file behind any ref (what the cache hashes: a changed file changes its key)."""
    src = _source(ref)
    return src.getvalue() if isinstance(src, io.BytesIO) else src.read_bytes()


def _source(ref: Any) -> Path | io.BytesIO:
    """Something `Image.open` accepts, from any ref."""
    if isinstance(ref, TarMember):
        return io.BytesIO(ref.read())
    if isinstance(ref, dict):
        ref = ref["bytes"] if ref.get("bytes") is not None else ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        return io.BytesIO(ref)
    if ref is None:
        raise FileNotFoundError("image ref has neither bytes nor path")
    return Path(ref)


def _describe(ref: Any) -> str:
    """A short name for a ref in log messages: its path, or what kind of in-memory image it is."""
    if isinstance(ref, TarMember):
        return f"{ref.shard}:{ref.name}"
    if isinstance(ref, dict):
        return str(ref.get("path") or "<image bytes>")
    return "<image bytes>" if isinstance(ref, (bytes, bytearray)) else str(ref)


def _open_guarded(src) -> Image.Image:
    """`Image.open` that refuses decompression bombs outright.

    PIL raises `DecompressionBombError` above 2 × `Image.MAX_IMAGE_PIXELS` but only *warns* between 1× and 2×, and then
    decodes (hundreds of MB per image); the warning is turned into an error here. The check reads the header only.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(src)


def inspect_image(ref: Any) -> tuple[str | None, tuple[int, int] | None]:
    """Cheap index-time check (header + structure, no full decode): (None, (h, w) upright) if usable, else
    (reason, None). The size is the one `load_image` will give: EXIF rotations by 90° swap it."""
    try:
        src = _source(ref)
        if (src.getbuffer().nbytes if isinstance(src, io.BytesIO) else src.stat().st_size) == 0:
            return "empty_file", None
        with _open_guarded(src) as image:
            w, h = image.size
            image.verify()
        if isinstance(src, io.BytesIO):
            src.seek(0)
        with Image.open(src) as image:  # verify() must come first and leaves the image unusable: open it again
            rotated = image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
    except FileNotFoundError:
        return "missing_file", None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "too_large", None
    except Exception:  # PIL raises many types on bad input (OSError, SyntaxError, ValueError, ...): all mean "skip"
        return "unreadable", None
    return None, ((w, h) if rotated else (h, w))


def check_image(ref: Any) -> str | None:
    """Cheap index-time check (header + structure, no full decode): None if usable, else the reason to skip."""
    return inspect_image(ref)[0]


def resized_too_large(size: tuple[int, int], resolution: int) -> bool:
    """True if scaling the shorter side to `resolution` would exceed PIL's pixel limit (a 1 × 5000 banner at 1024 px
    would become a 5-gigapixel image before the crop)."""
    limit = Image.MAX_IMAGE_PIXELS
    short, long = sorted(size)
    return limit is not None and short > 0 and resolution * (long * resolution / short) > limit


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: transparency composited on white, 16-bit grey rescaled (PIL's convert would clip at 255)."""
    if image.mode.startswith("I") or image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        # 16-bit data (I;16*, or "I" holding it) spans 0..65535; plain 8-bit-range "I"/"F" is left as is.
        if image.mode.startswith("I;16") or grey.max() > 255:
            grey = grey / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels often hold arbitrary (black) colour; dropping alpha would show it, white is neutral.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def load_image(ref: Any) -> Image.Image:
    """Fully decode a ref into an upright RGB image; raises whatever PIL raises on a broken file (or a bomb)."""
    with _open_guarded(_source(ref)) as image:
        image.load()
        # Phone photos store their rotation in EXIF; size conditioning must see the upright (h, w).
        return to_rgb(ImageOps.exif_transpose(image))


# ----------------------------------------------------------------------------------------------------------------------
# Transforms (PIL + torch; randomness only from the generator passed in). Sizes are (h, w), SDXL's order.


def cover_size(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) after scaling an image of `size_hw` just enough to cover `target_hw`, keeping its aspect ratio.

    For a square target this is "shorter side = resolution"; for a bucket it is the scale at which one side fits.
    """
    (h, w), (th, tw) = size_hw, target_hw
    scale = max(th / h, tw / w)
    return max(th, round(h * scale)), max(tw, round(w * scale))


def draw_crop_flip(resized_hw: tuple[int, int], target_hw: tuple[int, int], *, center_crop: bool, random_flip: bool,
                   generator: torch.Generator | None) -> tuple[int, int, bool]:
    """(top, left, flip) of a `target_hw` crop from a `resized_hw` image: centred or drawn, then a coin for the flip
    (the generator is only drawn from when something is random)."""
    (h, w), (th, tw) = resized_hw, target_hw
    if center_crop:
        top, left = (h - th) // 2, (w - tw) // 2
    else:
        top = int(torch.randint(0, h - th + 1, (), generator=generator))
        left = int(torch.randint(0, w - tw + 1, (), generator=generator))
    flip = random_flip and torch.rand((), generator=generator).item() < 0.5
    return top, left, flip


def crop_conditioning(resized_hw: tuple[int, int], target_hw: tuple[int, int], top: int, left: int,
                      flip: bool) -> tuple[int, int]:
    """SDXL's crop_top_left for a crop at (top, left) of the resized image, as it sits after the optional flip.

    Important: condition on the crop in the *flipped* image (as SDXL / diffusers do), else the model learns that
    flipped crops come from the other side.
    """
    return top, (resized_hw[1] - left - target_hw[1]) if flip else left


def transform_image(image: Image.Image, target_hw: tuple[int, int], top: int, left: int, flip: bool) -> torch.Tensor:
    """Resize to cover `target_hw`, crop at (top, left), maybe flip → (3, h, w) float32 in [-1, 1]."""
    (th, tw), (h, w) = target_hw, cover_size((image.height, image.width), target_hw)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    image = image.crop((left, top, left + tw, top + th))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets (SDXL, arXiv:2307.01952 §2.3): each image trains at the bucket nearest its aspect ratio, with
# about resolution² pixels; a batch holds one bucket only, so its tensors stack.


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


def add_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """SDXL UNet `time_ids` (B, 6) = [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (arXiv:2307.01952 §2.2)."""
    parts = [torch.atleast_2d(torch.as_tensor(x)) for x in (original_size, crop_top_left, target_size)]
    time_ids = torch.cat(parts, dim=-1)
    return time_ids if dtype is None else time_ids.to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Dataset


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


def sdxl_item(image: Image.Image, caption: str, target: tuple[int, int], top: int, left: int,
              flip: bool) -> dict[str, Any]:
    """One training item: pixels cropped at (top, left) of the resized image, caption, SDXL micro-conditioning."""
    size = (image.height, image.width)  # (h, w): SDXL's order, not PIL's (w, h)
    return {
        "pixel_values": transform_image(image, target, top, left, flip),
        "caption": caption,
        "original_size": torch.tensor(size),
        "crop_top_left": torch.tensor(crop_conditioning(cover_size(size, target), target, top, left, flip)),
        "target_size": torch.tensor(target),
    }


def collate_fn(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors into a batch (nested dicts too, e.g. cached text conditioning); captions stay a list of str."""
    return torch.utils.data.default_collate(items)


# ----------------------------------------------------------------------------------------------------------------------
# Indexing: each source yields (key, ref, caption) candidates; `_scan` checks them and fills the summary.


def _caption_text(value: Any) -> str:
    """Normalise a caption cell (None, str, number) to a stripped str."""
    return "" if value is None else str(value).strip()


def _scan(candidates: Iterable[tuple[Any, Any, str]], max_samples: int | None, summary: DataSummary,
          resolution: int | None = None):
    """Keep candidates whose header PIL can parse, up to `max_samples`; count the rest by reason.
    Returns the kept keys, their captions and their upright (h, w) sizes (for buckets and cache keys)."""
    keys, captions, sizes = [], [], []
    for key, ref, caption in candidates:
        if max_samples is not None and len(keys) >= max_samples:
            break
        size = _admit(ref, caption, summary, resolution)
        if size is None:
            continue
        keys.append(key)
        captions.append(caption)
        sizes.append(size)
    summary.n_ok = len(keys)
    return keys, captions, sizes


def _admit(ref: Any, caption: str, summary: DataSummary, resolution: int | None) -> tuple[int, int] | None:
    """The header check every source applies to a candidate: its upright (h, w) if usable, else None; either way
    counted in the summary (skip reason, upscaled, missing caption)."""
    reason, size = inspect_image(ref)
    if reason is None and resolution is not None and resized_too_large(size, resolution):
        reason = "too_large"
    if reason is not None:
        summary.skip(reason)
        return None
    summary.n_upscaled += resolution is not None and min(size) < resolution
    summary.n_missing_caption += not caption
    return size


def _decode_text(raw: bytes, summary: DataSummary) -> str:
    """UTF-8 (a byte-order mark dropped); invalid bytes become U+FFFD and are counted rather than losing the image."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        summary.n_caption_not_utf8 += 1
        return raw.decode("utf-8-sig", errors="replace")


def _metadata_rows(path: Path, summary: DataSummary) -> tuple[list[tuple[int, dict]], set]:
    """(1-based line number, row) for the rows of `metadata.jsonl` / `.csv` that parse and name a file, and every
    column seen; any other line is skipped and its number kept in the summary."""
    rows, columns = [], set()
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_decode_text(path.read_bytes(), summary), newline=""))
        columns.update(reader.fieldnames or ())
        for row in reader:
            # A row with more cells than the header puts them under the key None; one with fewer leaves None values.
            if None in row or not row.get("file_name"):
                summary.bad_metadata_lines.append(reader.line_num)
            else:
                rows.append((reader.line_num, row))
        return rows, columns
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(_decode_text(raw, summary))
            except ValueError:  # json.JSONDecodeError
                row = None
            columns.update(row if isinstance(row, dict) else ())
            if isinstance(row, dict) and isinstance(row.get("file_name"), str) and row["file_name"]:
                rows.append((number, row))
            else:
                summary.bad_metadata_lines.append(number)
    return rows, columns


def _read_metadata(root: Path, caption_column: str, summary: DataSummary | None = None) -> dict[str, str] | None:
    """Captions by relative posix path from `metadata.jsonl` / `metadata.csv` at the root, or None if neither exists."""
    found = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if not found:
        return None
    if len(found) > 1:
        raise DataError(f"both {' and '.join(str(p) for p in found)} exist; keep one so captions are unambiguous")
    path = found[0]
    summary = summary if summary is not None else DataSummary()
    rows, seen = _metadata_rows(path, summary)
    columns = sorted(str(k) for k in seen)
    # A column missing from the whole file is a configuration error, not a few bad lines.
    for column in ("file_name", caption_column):
        if seen and column not in seen:
            raise DataError(f"column {column!r} not found in {path}; available columns: {columns}")
    captions: dict[str, str] = {}
    for number, row in rows:
        # One name per file: `./a.png`, `a.png` and `sub/../a.png` are the same row key.
        name = posixpath.normpath(str(row["file_name"]).replace("\\", "/"))
        if name in captions:  # a duplicate: the last row wins, and the summary says which line that was
            summary.n_duplicate_rows += 1
            summary.duplicate_winners[name] = number
        captions[name] = _caption_text(row.get(caption_column))
    if summary.n_duplicate_rows:
        winners = list(summary.duplicate_winners.items())[:10]
        logger.warning("data: %s names %d file(s) more than once; the last row wins: %s", path, len(winners),
                       ", ".join(f"{name} (line {number}: {captions[name]!r})" for name, number in winners))
    return captions


def _visible_files(root: Path) -> list[Path]:
    """Every file under `root` (recursive, sorted by relative path) outside hidden folders (.ipynb_checkpoints, .git,
    …: copies and junk, not training data). Symlinked folders are not descended into (pathlib's rglob)."""
    return sorted((p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                  key=lambda p: p.relative_to(root).as_posix())


def _outside(files: list[Path], root: Path) -> set[Path]:
    """The files whose real location (symlinks resolved) is outside `root`."""
    real_root = root.resolve()
    return {p for p in files if not p.resolve().is_relative_to(real_root)}


def _count_listed_files(metadata: dict[str, str], visible: list[Path], root: Path, summary: DataSummary) -> None:
    """Metadata rows whose file is absent → `missing_file`; unreadable formats (a GIF, listed or not, or any other
    listed non-image file) → `unsupported_format`."""
    present = {p.relative_to(root).as_posix(): p for p in visible}
    unsupported = {rel for rel, p in present.items() if p.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS}
    unsupported |= {rel for rel in metadata if rel in present and present[rel].suffix.lower() not in IMAGE_EXTENSIONS}
    summary.skip("unsupported_format", len(unsupported))
    summary.skip("missing_file", len(set(metadata) - set(present)))


def index_folder(cfg: Any, summary: DataSummary):
    """Image files under `cfg.path` (recursive, sorted) with captions from metadata, then `.txt`, else ''.

    A file symlink pointing outside the folder is followed and counted (`data.follow_symlinks=false`: skipped as
    `symlink_outside`)."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} is not a directory")
    visible = _visible_files(root)
    files = [p for p in visible if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        gifs = [p.name for p in visible if p.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS]
        hint = f" ({len(gifs)} file(s) in unsupported formats, e.g. {gifs[0]}: convert them to PNG)" if gifs else ""
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}{hint}")
    metadata = _read_metadata(root, cfg.caption_column, summary) or {}
    _count_listed_files(metadata, visible, root, summary)
    outside = _outside(files, root)
    if cfg.follow_symlinks:
        summary.n_symlinks_outside = len(outside)
    else:
        summary.skip("symlink_outside", len(outside))
        files = [p for p in files if p not in outside]

    def candidates() -> Iterator[tuple[Path, Path, str]]:
        for path in files:
            rel = path.relative_to(root).as_posix()
            txt = path.with_suffix(".txt")
            if rel in metadata:
                caption = metadata[rel]
            else:
                caption = _caption_text(_decode_text(txt.read_bytes(), summary)) if txt.is_file() else ""
            yield path, path, caption

    return _scan(candidates(), cfg.max_samples, summary, cfg.resolution)


class _HFImageColumn(Sequence):
    """Lazy view of an HF image column at the kept rows, so images stay on disk until an item is loaded."""

    def __init__(self, ds: Any, column: str, rows: list[int]):
        self.ds, self.column, self.rows = ds.select_columns([column]), column, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.ds[self.rows[i]][self.column]


def _load_hf(path: str, split: str):
    """A `save_to_disk` folder, else an image folder via `imagefolder`, else a hub name (needs network)."""
    import datasets  # heavy import, only paid when this source is used

    folder = Path(path)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"split {split!r} not found in {path!r}; available splits: {sorted(loaded)}")
            loaded = loaded[split]
        return loaded
    if folder.is_dir():
        return datasets.load_dataset("imagefolder", data_dir=str(folder), split=split)
    return datasets.load_dataset(path, split=split)


def index_hf(cfg: Any, summary: DataSummary):
    """Rows of an HF dataset with their captions; image bytes are only header-checked here, decoded per item."""
    import datasets

    ds = _load_hf(cfg.path, cfg.split)
    for column in (cfg.image_column, cfg.caption_column):
        if column not in ds.column_names:
            raise DataError(f"column {column!r} not found in dataset {cfg.path!r}; "
                            f"available columns: {ds.column_names}")
    if len(ds) == 0:
        raise DataError(f"dataset {cfg.path!r} (split {cfg.split!r}) has no rows")
    ds = ds.select_columns([cfg.image_column, cfg.caption_column])
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        # decode=False hands us {"bytes", "path"}: we decode ourselves, once, with our own error handling.
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))

    def candidates() -> Iterator[tuple[int, Any, str]]:
        for start in range(0, len(ds), _HF_SCAN_BATCH):
            batch = ds[start:start + _HF_SCAN_BATCH]
            for offset, (ref, caption) in enumerate(zip(batch[cfg.image_column], batch[cfg.caption_column])):
                yield start + offset, ref, _caption_text(caption)

    rows, captions, sizes = _scan(candidates(), cfg.max_samples, summary, cfg.resolution)
    return _HFImageColumn(ds, cfg.image_column, rows), captions, sizes


def _shard_paths(spec: str) -> list[Path]:
    """Tar shards from a folder (every *.tar in it, sorted) or a brace pattern (`shards/{000..099}.tar`)."""
    from braceexpand import braceexpand  # webdataset's own shard-list syntax

    folder = Path(spec)
    paths = sorted(folder.glob("*.tar")) if folder.is_dir() else [Path(p) for p in braceexpand(spec)]
    if not paths:
        raise DataError(f"no .tar shards found for data.path {spec!r}")
    for path in paths:
        if not path.is_file():
            raise DataError(f"data.path {spec!r}: shard {str(path)} does not exist")
    return paths


def _tar_samples(shard: Path, summary: DataSummary) -> Iterator[tuple[str, TarMember | None, str]]:
    """(key, image member, caption) per sample of one shard, grouped as webdataset groups them: consecutive members
    sharing a key (the path up to the first dot of the file name); an unreadable shard is skipped and counted."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    try:
        with tarfile.open(shard, mode="r:") as tar:  # "r:": uncompressed only, so members have fixed offsets
            members = [m for m in tar if m.isfile()]
            groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
            for m in members:
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1].setdefault(ext.lower(), m)
            for key, files in groups:
                image = next((files[e] for e in WDS_IMAGE_EXTENSIONS if e in files), None)
                caption = ""
                if "txt" in files:
                    caption = _caption_text(_decode_text(tar.extractfile(files["txt"]).read(), summary))
                member = None if image is None else TarMember(str(shard), image.name, image.offset_data, image.size)
                yield f"{shard.name}/{key}", member, caption
    except (tarfile.TarError, OSError) as err:
        logger.warning("data: cannot read shard %s (%s: %s); skipping it", shard, type(err).__name__, err)
        summary.skip("unreadable_shard")


def index_webdataset(cfg: Any, summary: DataSummary):
    """Samples of webdataset tar shards (`key.jpg`/`key.png` + `key.txt`), indexed by member offset: the images stay
    inside the shards and are read by random access, so shuffling, resuming, buckets and the cache work as for a
    folder while the file system sees a few large files."""

    def candidates() -> Iterator[tuple[TarMember, TarMember, str]]:
        for shard in _shard_paths(cfg.path):
            for _key, member, caption in _tar_samples(shard, summary):
                if member is None:
                    summary.skip("no_image")
                    continue
                yield member, member, caption

    return _scan(candidates(), cfg.max_samples, summary, cfg.resolution)


# ----------------------------------------------------------------------------------------------------------------------
# Streaming webdataset shards: remote (`pipe:`, http(s)://, …) or gzip-compressed shards cannot be read by offset, so
# they are read front to back through webdataset's tar streaming. What keeps this exact and distributable:
# - the epoch has a declared length (`data.num_samples`, over all ranks); every rank yields the same number of batches
#   (DDP needs that), each loader worker a fixed share; a worker whose shards run out starts over on them;
# - the shard order of an epoch depends on (seed, epoch) only; ranks and then loader workers take disjoint slices;
# - samples are header-checked as they arrive (the same check as indexing), shuffled in a buffer seeded from
#   (rank_seed, epoch, worker), grouped into batches (per bucket with data.buckets), and only then decoded;
# - so a resume replays the epoch's stream and drops the consumed batches *before decoding* them.


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


SOURCES = {"folder": index_folder, "hf": index_hf, "webdataset": index_webdataset}


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
