"""Reading images: any ref → an upright RGB image, the cheap index-time header check, and the counts of what was
kept and skipped (`DataSummary`). A "ref" is a path, raw bytes, an HF Image dict {"bytes": ..., "path": ...}
(decode=False) or a `TarMember`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Image formats a folder may hold that are not read (GIF: animated, palette-limited; convert to PNG to use them):
# counted as `unsupported_format`, as is any other existing file a metadata row names with a non-image extension.
UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".svg", ".ico")
WDS_IMAGE_EXTENSIONS = tuple(e[1:] for e in IMAGE_EXTENSIONS)  # webdataset keys are extensions without the dot


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
# Reading images


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
# The index-time guard


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
