"""Indexing the sources: an image folder (captions from metadata, then same-stem `.txt` files), an HF `datasets`
dataset, or local uncompressed webdataset tar shards read by member offset. Each source yields (key, ref, caption)
candidates; `_scan` header-checks them and fills the summary.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import DataError
from .images import (IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS, WDS_IMAGE_EXTENSIONS, DataSummary, TarMember,
                     _admit)

logger = logging.getLogger("lcm.data")  # one logger for the package: what users (and tests) filter on

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_HF_SCAN_BATCH = 256  # rows read at a time during the HF header scan; keeps memory flat on large datasets


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


SOURCES = {"folder": index_folder, "hf": index_hf, "webdataset": index_webdataset}
