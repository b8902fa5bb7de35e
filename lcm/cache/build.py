"""Writing the cache (`lcm cache`): plan the records the data and encoders need, encode the missing ones, commit.

Re-running `lcm cache` re-encodes exactly the records whose key changed: a new image, caption, crop size, VAE or
text encoder; everything else is reused after its checksum is verified (a damaged record is re-encoded).

Several processes: `accelerate launch --num_processes N -m lcm.cli cache …` shares the work out (each process encodes
a share on its own device into its own shards; the main process commits the manifest after all have finished) and
writes the records one process would write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env
from omegaconf import OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data import (DataSummary, add_time_ids, build_dataset, cover_size, crop_conditioning, draw_crop_flip,
                    format_summary, is_streaming, load_image, read_bytes, transform_image)
from .format import (FORMAT, MANIFEST, CacheError, _data_settings, _digest, _Shards, _tensor_digest,
                     encoder_identity, read_manifest)

logger = logging.getLogger(__package__)  # "lcm.cache", as before the split into a package


# ----------------------------------------------------------------------------------------------------------------------
# Writing. `lcm cache` may run as N processes (`accelerate launch --num_processes N -m lcm.cli cache …`): they share
# the hashing of the images and the checks of the old records, each runs a share of the encoder calls on its own
# device into its own shards, and the main process writes the manifest once every process has finished. The encoder
# calls (which variants go in which batch, and which entry writes a record that several need) are fixed before they
# are shared out, so the records are those one process would write, bit for bit where the encoders are deterministic.


class _ShardWriter:
    """Collects records and writes them as new, immutable shards of at most ~`max_bytes` (tmp file + rename).

    Names are `shard-GGGGGG-RRR-NNNNN`: G the run's generation (above every shard already in the folder, fixed by the
    main process before any process writes), R the process index, N a counter. No two processes or runs write the same
    name, so a run never touches a shard that the committed manifest reads.
    """

    def __init__(self, root: Path, generation: int, rank: int, max_bytes: int):
        self.root, self.prefix, self.max_bytes = root, f"shard-{generation:06d}-{rank:03d}", max_bytes
        self.records: dict[str, dict] = {}
        self.next_id, self.pending, self.size = 0, {}, 0

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
        self.pending[key] = tensors
        self.size += sum(t.numel() * t.element_size() for t in tensors.values())
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.prefix}-{self.next_id:05d}.safetensors"
        tmp = self.root / f".tmp-{name}"
        save_file({f"{key}/{n}": t for key, ts in self.pending.items() for n, t in ts.items()}, str(tmp),
                  metadata={"format": str(FORMAT)})
        os.replace(tmp, self.root / name)
        for key, ts in self.pending.items():
            self.records[key] = {"shard": name, "tensors": sorted(ts), "digest": _tensor_digest(ts)}
        self.next_id, self.pending, self.size = self.next_id + 1, {}, 0


def _next_generation(root: Path) -> int:
    """One more than the highest generation among the shards in `root` (`shard-G…`, committed or left by a crash)."""
    taken = [int(g) for p in root.glob("shard-*.safetensors") if (g := p.stem.split("-")[1]).isdigit()]
    return max(taken, default=-1) + 1


@dataclasses.dataclass
class CacheReport:
    items: int
    latents_encoded: int
    texts_encoded: int
    reused: int
    damaged: int  # records found damaged and re-encoded
    shards_removed: int
    summary: str

    def __str__(self) -> str:
        return (f"cache: {self.items} items; encoded {self.latents_encoded} latent and {self.texts_encoded} text "
                f"record(s), reused {self.reused}, re-encoded {self.damaged} damaged, removed {self.shards_removed} "
                f"stale shard(s). {self.summary}")


def _verified(shards: _Shards, keys: Iterable[str], state: PartialState) -> tuple[set, int]:
    """The keys whose records read back intact, and how many did not; each process checks a share.

    A collective: every process must call it with the same keys."""
    good, bad = set(), 0
    with state.split_between_processes(sorted(keys)) as mine:
        for key in mine:
            try:
                shards.read(key)
                good.add(key)
            except CacheError as err:
                bad += 1
                logger.warning("%s", err)
    parts = gather_object([(sorted(good), bad)])
    return {k for keys_ok, _ in parts for k in keys_ok}, sum(n for _, n in parts)


def _image_digests(dataset, state: PartialState) -> list[str]:
    """Every image file's content digest, in dataset order; each process reads and hashes a share (a collective)."""
    with state.split_between_processes(list(range(len(dataset)))) as mine:
        own = [hashlib.blake2b(read_bytes(dataset.images[i]), digest_size=16).hexdigest() for i in mine]
    return [d for part in gather_object([own]) for d in part]


def _center_crop(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], int, int]:
    """(resized (h, w), top, left) of the centred crop, the only crop a cache can hold."""
    resized = cover_size(size, target)
    top, left, _ = draw_crop_flip(resized, target, center_crop=True, random_flip=False, generator=None)
    return resized, top, left


def _plan(dataset, image_digests: list[str], identity: dict, ref_key: str, flips: tuple[bool, ...]) -> list[list[dict]]:
    """Every item's variants (one per flip) with their record keys, from image digests and header sizes alone."""
    plan = []
    for i, image_digest in enumerate(image_digests):
        size, target = tuple(dataset.sizes[i]), dataset.target_size(i)
        resized, top, left = _center_crop(size, target)
        variants = []
        for flip in flips:
            crop = crop_conditioning(resized, target, top, left, flip)
            time_ids = add_time_ids(torch.tensor(size), torch.tensor(crop), torch.tensor(target))[0].tolist()
            variants.append({
                "latent": _digest("latent", identity["latent"], image_digest, target, (top, left), flip),
                # The text record omits tensors equal to the shared reference's, so it depends on that reference.
                "text": _digest("text", identity["text"], dataset.captions[i], time_ids, ref_key),
                "caption": dataset.captions[i], "original_size": list(size), "crop_top_left": list(crop),
                "target_size": list(target), "flip": flip})
        plan.append(variants)
    return plan


def _batches(todo: list[tuple[int, dict]], present: set, batch_size: int) -> list[list[dict]]:
    """The encoder calls, in a fixed order: the variants to encode grouped by target size, `batch_size` per call.

    Each entry lists the records it writes: those not present and not written by an earlier entry (two items can
    share a record: the same image bytes, or the same caption and size conditioning). Fixed before the calls are
    shared between processes, so a record comes from the same call, hence the same bits, for any number of processes.
    """
    groups: dict[tuple, list] = {}
    for i, v in todo:
        groups.setdefault(tuple(v["target_size"]), []).append((i, v))
    claimed, batches = set(present), []
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            batch = []
            for i, v in group[start:start + batch_size]:
                writes = [part for part in ("latent", "text") if v[part] not in claimed]
                claimed.update(v[part] for part in writes)
                batch.append({"index": i, "variant": v, "writes": writes})
            batches.append(batch)
    return batches


def _time_ids(variants: list[dict]) -> torch.Tensor:
    return add_time_ids(*(torch.tensor([v[k] for v in variants])
                          for k in ("original_size", "crop_top_left", "target_size")))


def _shared_uncond(pipe, size: tuple[int, int], target: tuple[int, int], device) -> dict[str, torch.Tensor]:
    """The empty caption's unconditional tensors (at the first item's size conditioning): the shared reference."""
    from ..encode import encode_text

    _, top, left = _center_crop(size, target)
    ref = {"original_size": list(size), "crop_top_left": [top, left], "target_size": list(target)}
    _, uncond = encode_text(pipe, [""], _time_ids([ref]), device)
    return {f"uncond.{k}": t[0].float().cpu() for k, t in uncond.items()}


class _Encoder:
    """Runs planned encoder calls (`_batches`) and hands the records each entry writes to the shard writer."""

    def __init__(self, pipe, dataset, writer: _ShardWriter, shared: dict, device):
        self.pipe, self.dataset, self.writer, self.shared, self.device = pipe, dataset, writer, shared, device
        self.n_latent = self.n_text = 0
        self.failed: set[int] = set()  # items whose image does not decode: left out of the cache

    def _pixels(self, entry: dict) -> torch.Tensor:
        v, index = entry["variant"], entry["index"]
        target = tuple(v["target_size"])
        try:
            image = load_image(self.dataset.images[index])
        except Exception as err:
            if index not in self.failed:
                logger.warning("cache: cannot decode item %d (%s: %s); leaving it out", index, type(err).__name__, err)
            self.failed.add(index)
            # A blank stand-in keeps the call as planned (the other entries' bits do not depend on this failure); the
            # entry's text record is still written, as another item may need it.
            return torch.zeros(3, *target)
        _, top, left = _center_crop(tuple(v["original_size"]), target)
        return transform_image(image, target, top, left, v["flip"])

    def __call__(self, batch: list[dict]) -> None:
        from ..encode import encode_batch

        variants = [e["variant"] for e in batch]
        inputs = {"pixel_values": torch.stack([self._pixels(e) for e in batch]),
                  "caption": [v["caption"] for v in variants],
                  **{k: torch.tensor([v[k] for v in variants])
                     for k in ("original_size", "crop_top_left", "target_size")}}
        mu, sigma, cond, uncond = encode_batch(self.pipe, inputs, self.device)
        for r, (entry, v) in enumerate(zip(batch, variants)):
            if "latent" in entry["writes"] and entry["index"] not in self.failed:
                self.writer.add(v["latent"], {"mean": mu[r], "std": sigma[r]})
                self.n_latent += 1
            if "text" in entry["writes"]:
                own = {f"cond.{k}": t[r] for k, t in cond.items()}
                own.update({f"uncond.{k}": t[r] for k, t in uncond.items()
                            if not torch.equal(t[r].float().cpu(), self.shared[f"uncond.{k}"])})
                self.writer.add(v["text"], own)
                self.n_text += 1


def _commit(root: Path, manifest: dict) -> int:
    """Write the manifest atomically, then remove what no live record uses; the number of stale shards removed.

    Called by the main process once every process has written its shards."""
    used = {r["shard"] for r in manifest["records"].values()}
    unseen = sorted(s for s in used if not (root / s).is_file())
    if unseen:
        raise CacheError(f"shard(s) {', '.join(unseen[:3])} written by other processes are not visible in {root} "
                         f"from the main process: data.cache_dir must be a folder every process shares (several "
                         f"machines: a shared filesystem)")
    tmp = root / f".tmp-{MANIFEST}"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, root / MANIFEST)  # the commit point: a crash before it leaves the old cache as it was
    stale = [p for p in root.glob("shard-*.safetensors") if p.name not in used]
    for p in [*stale, *root.glob(".tmp-shard-*")]:  # stale shards, and partial ones a crashed run left
        p.unlink()
    return len(stale)


def _check_cacheable(data_cfg) -> None:
    """Refuse data settings a cache cannot hold: no cache folder, streamed data, random crops."""
    if not data_cfg.cache_dir:
        raise CacheError("set data.cache_dir=FOLDER: where `lcm cache` writes and training reads the cache")
    if is_streaming(data_cfg):
        raise CacheError(f"data.path {data_cfg.path!r} is streamed (a URL, pipe: or compressed shards, or "
                         "data.streaming=true); the cache needs random access: use local uncompressed .tar shards")
    if not data_cfg.center_crop:
        raise CacheError("data.center_crop=false draws a new random crop every epoch, which cannot be cached; set "
                         "data.center_crop=true to cache (random flips are cached both ways)")


def _process_state(device: Optional[str]) -> tuple[PartialState, Any]:
    """accelerate's process state, and the device this process encodes on."""
    # As `Accelerator` does: ACCELERATE_USE_CPU (`accelerate launch --cpu`, or CPU ranks) makes the processes gloo ones.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if device is not None and state.num_processes > 1:
        raise CacheError(f"--device={device} is for one process; under accelerate launch each of the "
                         f"{state.num_processes} processes encodes on its own device: drop --device")
    return state, device or state.device


def _reference_key(old: dict, identity: dict, shards: _Shards, first: tuple, state: PartialState) -> str:
    """The shared unconditional reference: the old one if intact and from the same text encoders, else a new one."""
    ref_key = old.get("uncond_ref")
    if (ref_key is None or old["identity"]["text"] != identity["text"]
            or not _verified(shards, [ref_key], state)[0]):  # the same on every process, so all call or none
        ref_key = _digest("uncond", identity["text"], first)
    return ref_key


def _plan_calls(cfg, dataset, identity: dict, ref_key: str, old: dict, shards: _Shards, state: PartialState,
                batch_size: int) -> tuple[list[list[dict]], set, int, list[list[dict]]]:
    """Keys of every variant; reuse what is present and intact; plan the encoder calls for the rest.

    (plan, present keys, how many old records were damaged, the encoder calls). A collective."""
    flips = (False, True) if cfg.data.random_flip else (False,)
    plan = _plan(dataset, _image_digests(dataset, state), identity, ref_key, flips)
    wanted = {v[k] for variants in plan for v in variants for k in ("latent", "text")} | {ref_key}
    present, damaged = _verified(shards, [k for k in wanted if k in old["records"]], state)
    todo = [(i, v) for i, variants in enumerate(plan) for v in variants
            if v["latent"] not in present or v["text"] not in present]
    return plan, present, damaged, _batches(todo, present, batch_size)


def _encode_share(cfg, batches: list[list[dict]], new_ref: bool, ref_key: str, shards: _Shards, dataset,
                  first: tuple, device, shard_mb: float, state: PartialState) -> tuple[_ShardWriter, _Encoder]:
    """This process's share of the calls, into its own shards (flushed). A collective.

    The main process fixes the run's shard generation (before anyone writes) and the shared reference every process
    compares uncond tensors with."""
    from ..models import load_pipeline

    root = shards.root
    with state.split_between_processes(batches) as mine:
        pipe = None
        if mine or (new_ref and state.is_main_process):
            pipe = load_pipeline(cfg.model.kind, cfg.model.pretrained, torch.float32, cfg.model.revision,
                                 cfg.model.variant, config_dir=cfg.model.config_dir).to(device)
        header = [None, None]
        if state.is_main_process:
            header = [_next_generation(root),
                      _shared_uncond(pipe, *first, device) if new_ref else shards.read(ref_key)]
        generation, shared = broadcast_object_list(header)
        writer = _ShardWriter(root, generation, state.process_index, int(shard_mb * 2**20))
        if new_ref and state.is_main_process:
            writer.add(ref_key, shared)
        encoder = _Encoder(pipe, dataset, writer, shared, device)
        for batch in tqdm(mine, desc="lcm cache", disable=not state.is_main_process):
            encoder(batch)
        writer.flush()
    return writer, encoder


def _new_manifest(cfg, old: dict, present: set, done: list, plan: list[list[dict]], dataset, identity: dict,
                  memo: dict, ref_key: str) -> tuple[dict, set]:
    """The manifest naming exactly the live records, from every process's records; and the live keys."""
    records = {k: old["records"][k] for k in present}
    failed: set[int] = set()
    for new, lost, _, _ in done:
        records.update(new)
        failed.update(lost)
    dataset.summary.n_decode_errors += len(failed)  # counted as the loader counts it
    items = [variants for i, variants in enumerate(plan) if i not in failed]
    if not items:
        raise CacheError(f"no item of {cfg.data.path!r} could be encoded: {format_summary(dataset.summary)}")
    live = {v[k] for variants in items for v in variants for k in ("latent", "text")} | {ref_key}
    records = {k: r for k, r in records.items() if k in live}
    summary = {**dataclasses.asdict(dataset.summary), "n_ok": len(items)}
    manifest = {"format": FORMAT, "data": _data_settings(cfg.data), "identity": identity,
                "model": OmegaConf.to_container(cfg.model, resolve=True), "files": memo, "summary": summary,
                "uncond_ref": ref_key, "records": records, "items": items}
    return manifest, live


def build_cache(cfg, batch_size: int = 16, device: Optional[str] = None, shard_mb: float = 1024.0) -> CacheReport:
    """Bring `cfg.data.cache_dir` up to date with `cfg.data` and `cfg.model`, encoding only what is missing.

    Items with any missing record run through the encoders (both: one batched call each); only missing records are
    written. The new manifest is the commit point; shards no live record uses are then removed.

    Under `accelerate launch --num_processes N` every process calls this: each encodes a share of the calls on its
    own device (accelerate's), and returns once the main process has committed the manifest. `device` picks the
    device of a single process.
    """
    _check_cacheable(cfg.data)
    state, device = _process_state(device)
    root = Path(cfg.data.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    old = read_manifest(root) if (root / MANIFEST).is_file() else {"records": {}, "files": {}}
    memo = dict(old["files"])
    identity = encoder_identity(cfg.model, memo)
    dataset = build_dataset(cfg.data, seed=cfg.train.seed)  # the same index (and skips) as uncached training
    shards = _Shards(root, dict(old["records"]))

    # 1. The shared unconditional reference. 2. Keys, reuse, and the plan of the encoder calls.
    first = dataset.sizes[0], dataset.target_size(0)
    ref_key = _reference_key(old, identity, shards, first, state)
    plan, present, damaged, batches = _plan_calls(cfg, dataset, identity, ref_key, old, shards, state, batch_size)

    # 3. Each process runs its share of the calls into its own shards.
    writer, encoder = _encode_share(cfg, batches, ref_key not in present, ref_key, shards, dataset, first, device,
                                    shard_mb, state)

    # 4. Gather every process's records (a barrier: all have finished writing); the manifest names exactly the live
    #    records. Every process computes the same report; only the main one writes.
    done = gather_object([(writer.records, sorted(encoder.failed), encoder.n_latent, encoder.n_text)])
    manifest, live = _new_manifest(cfg, old, present, done, plan, dataset, identity, memo, ref_key)
    removed = [_commit(root, manifest) if state.is_main_process else None]
    broadcast_object_list(removed)  # no process returns before the manifest is committed
    return CacheReport(len(manifest["items"]), sum(d[2] for d in done), sum(d[3] for d in done), len(live & present),
                       damaged, removed[0], format_summary(DataSummary(**manifest["summary"])))
