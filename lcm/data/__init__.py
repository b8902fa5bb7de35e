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

The package, one job per module (each imports only the ones above it):
- `images.py`: reading any ref into an upright RGB image, the header check, `DataSummary` and its log line;
- `transforms.py`: cover-resize, crop, flip, SDXL size/crop conditioning (`sdxl_item`, `add_time_ids`);
- `buckets.py`: the aspect-ratio bucket table and `BucketBatchSampler`;
- `sources.py`: the indexers (`SOURCES`: folder, HF datasets, webdataset shards by offset) and caption reading;
- `stream.py`: streamed webdataset shards (`StreamingImages`, `StreamEpoch`, `stream_loader`);
- `loader.py`: `CaptionedImages`, `build_dataset`, `collate_fn`, `build_loader`.
Seeds (batch order, crops, flips) come from `lcm.seeds`.
"""

from .buckets import BucketBatchSampler, bucket_sizes, nearest_bucket
from .images import (IMAGE_EXTENSIONS, DataSummary, TarMember, check_image, format_summary, inspect_image,
                     load_image, read_bytes, to_rgb)
from .loader import CaptionedImages, build_dataset, build_loader, collate_fn
from .sources import SOURCES
from .stream import StreamEpoch, StreamingImages, build_stream, is_streaming
from .transforms import add_time_ids, cover_size, crop_conditioning, draw_crop_flip, sdxl_item, transform_image

__all__ = [
    "IMAGE_EXTENSIONS", "SOURCES", "BucketBatchSampler", "CaptionedImages", "DataSummary", "StreamEpoch",
    "StreamingImages", "TarMember", "add_time_ids", "bucket_sizes", "build_dataset", "build_loader", "build_stream",
    "check_image", "collate_fn", "cover_size", "crop_conditioning", "draw_crop_flip", "format_summary",
    "inspect_image", "is_streaming", "load_image", "nearest_bucket", "read_bytes", "sdxl_item", "to_rgb",
    "transform_image",
]
