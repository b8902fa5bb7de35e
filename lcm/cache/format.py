"""The cache's on-disk format: record keys, encoder identities, checksummed reads of the shards, the manifest.

Keys. A latent record is keyed by (image file digest, target size, crop, flip, VAE identity); a text record by
(caption, micro-conditioning numbers, text-encoder identity). An identity is the digest of the files of those
components in the model folder (memoised by size + mtime, so a training start only stats them), or `id@revision` for
a hub id.

Integrity: every record carries a digest of its bytes, checked on every read; a damaged or missing shard raises
`CacheError` naming the file and the fix (re-run `lcm cache`, which re-encodes what is damaged), never wrong data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from ..errors import UserError

FORMAT = 1  # bump when what a record holds changes: every key changes with it
MANIFEST = "manifest.json"
# Data keys that do not change what is encoded (so may differ between `lcm cache` and training).
_RUNTIME_DATA_KEYS = ("num_workers", "cache_dir")


class CacheError(UserError, ValueError):
    """The cache cannot be used as it is: damaged, or made for other data settings or encoders."""


# ----------------------------------------------------------------------------------------------------------------------
# Digests and identities


def _digest(*parts: Any) -> str:
    """A short stable digest of JSON-able parts."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def _file_digest(path: Path, memo: dict) -> str:
    """Content digest of a file, memoised by (path, size, mtime): unchanged weights are hashed once, not every run."""
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if stamp not in memo:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        memo[stamp] = h.hexdigest()
    return memo[stamp]


def encoder_identity(model_cfg, memo: dict) -> dict[str, str]:
    """{"latent": VAE identity, "text": text encoders + tokenizers identity} for `model_cfg`.

    A local pipeline folder is identified by the contents of those components' files; a hub id by id@revision
    (pin `model.revision` to a commit for a cache that cannot go stale). A single-file checkpoint holds every
    component in one file, so its whole content counts (a new UNet in the same file re-encodes too: conservative),
    plus those components' files in its config folder (tokenizers, configs).
    """
    from ..models import encoder_names, is_single_file, single_file_configs

    names, root = encoder_names(model_cfg.kind), Path(model_cfg.pretrained)
    single = is_single_file(model_cfg.pretrained)
    if single:
        root = single_file_configs(model_cfg.pretrained, model_cfg.config_dir)

    def identity(prefixes: tuple[str, ...]) -> str:
        parts = [n for n in names if n.startswith(prefixes)]
        if not root.is_dir():
            return _digest(FORMAT, model_cfg.kind, model_cfg.pretrained, model_cfg.revision or "main",
                           model_cfg.variant, parts)
        files = sorted(p for n in parts if (root / n).is_dir() for p in (root / n).rglob("*") if p.is_file())
        folder = [(p.relative_to(root).as_posix(), _file_digest(p, memo)) for p in files]
        if single:
            return _digest(FORMAT, model_cfg.kind, _file_digest(Path(model_cfg.pretrained), memo), folder)
        return _digest(FORMAT, model_cfg.kind, folder)

    return {"latent": identity(("vae",)), "text": identity(("text_encoder", "tokenizer"))}


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of a record's names, dtypes, shapes and bytes: what a read checks before handing tensors out."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _data_settings(data_cfg) -> dict:
    """The data config that decides what is encoded (everything but runtime knobs)."""
    settings = OmegaConf.to_container(data_cfg, resolve=True) if OmegaConf.is_config(data_cfg) else dict(data_cfg)
    return {k: v for k, v in settings.items() if k not in _RUNTIME_DATA_KEYS}


# ----------------------------------------------------------------------------------------------------------------------
# Reading


class _Shards:
    """Open safetensors shards of one cache, per process (handles are not picklable, so DataLoader workers reopen)."""

    def __init__(self, root: Path, records: dict):
        self.root, self.records, self._open = root, records, {}

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}

    def _handle(self, shard: str):
        if shard not in self._open:
            path = self.root / shard
            try:
                self._open[shard] = safe_open(str(path), framework="pt")
            except Exception as err:  # missing file, truncated or garbled header: safetensors raises several types
                raise CacheError(f"cache shard {path} cannot be read ({type(err).__name__}: {err}); re-run "
                                 f"`lcm cache` with the same config to re-encode what it held") from err
        return self._open[shard]

    def read(self, key: str) -> dict[str, torch.Tensor]:
        """A record's tensors, after checking them against the digest written with them."""
        record = self.records[key]
        path = self.root / record["shard"]
        try:
            handle = self._handle(record["shard"])
            tensors = {name: handle.get_tensor(f"{key}/{name}") for name in record["tensors"]}
        except CacheError:
            raise
        except Exception as err:
            raise CacheError(f"cache shard {path}: record {key} cannot be read ({type(err).__name__}: {err}); "
                             f"re-run `lcm cache` with the same config to re-encode it") from err
        if _tensor_digest(tensors) != record["digest"]:
            raise CacheError(f"cache shard {path}: record {key} fails its checksum (the file is damaged); re-run "
                             f"`lcm cache` with the same config to re-encode it")
        return tensors


def read_manifest(cache_dir: str | Path) -> dict:
    """The manifest of a cache folder; CacheError if there is none or it is not one this version wrote."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"data.cache_dir={str(cache_dir)!r} holds no {MANIFEST}; create it with "
                         f"`lcm cache --config …` first")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise CacheError(f"{path} is not valid JSON ({err}); re-run `lcm cache`") from err
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} has cache format {manifest.get('format')!r}, this version reads {FORMAT}; "
                         f"re-run `lcm cache`")
    return manifest


def check_cache_matches(manifest: dict, cfg, cache_dir) -> None:
    """Refuse a cache made with other data settings or other encoders than `cfg` would train with."""
    cached, wanted = manifest["data"], _data_settings(cfg.data)
    changed = sorted(k for k in set(cached) | set(wanted) if cached.get(k) != wanted.get(k))
    if changed:
        diffs = ", ".join(f"data.{k}: cache {cached.get(k)!r} vs config {wanted.get(k)!r}" for k in changed)
        raise CacheError(f"cache {cache_dir} was made with other data settings ({diffs}); re-run `lcm cache` "
                         f"with this config (unchanged entries are reused)")
    identity = encoder_identity(cfg.model, dict(manifest["files"]))
    for part, what in (("latent", "VAE"), ("text", "text encoders")):
        if identity[part] != manifest["identity"][part]:
            raise CacheError(f"cache {cache_dir} was encoded with another {what} than model.pretrained="
                             f"{cfg.model.pretrained!r}; re-run `lcm cache` with this config")
