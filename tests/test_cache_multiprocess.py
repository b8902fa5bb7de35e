"""`lcm cache` as 2 processes (`accelerate launch`, gloo on CPU) writes the cache one process writes, bit for bit;
a re-run encodes only what changed; a process that crashes before the manifest is committed leaves the old cache
intact. One launch runs three cache builds (tests/_cache_phases.py); the references are built here in one process."""

import json
from pathlib import Path

import torch

from lcm.cache import MANIFEST, CachedDataset, build_cache, read_manifest
from lcm.config import load_config

from _helpers import accelerate_launch, mixed_size_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _assert_equal(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def _assert_same_cache(cfg_a, cfg_b) -> None:
    """The same items and record keys, and every record's tensors equal bit for bit (read with their checksums);
    then every item of both flips through the training dataset."""
    a, b = CachedDataset(cfg_a), CachedDataset(cfg_b)
    ma, mb = read_manifest(cfg_a.data.cache_dir), read_manifest(cfg_b.data.cache_dir)
    assert ma["items"] == mb["items"] and ma["uncond_ref"] == mb["uncond_ref"]
    assert ma["records"].keys() == mb["records"].keys()
    for key in ma["records"]:
        _assert_equal(a.shards.read(key), b.shards.read(key), key)
    for epoch in (0, 1, 2):  # random_flip: epochs pick either flip
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(len(a)):
            _assert_equal(a[i], b[i], f"epoch {epoch} item {i}")


def test_two_processes_write_the_one_process_cache(tiny_sdxl_dir, tmp_path):
    data = mixed_size_image_folder(tmp_path / "data")
    # Buckets give several target sizes, so several encoder calls; flips double the variants.
    overrides = [f"model.pretrained={tiny_sdxl_dir}", f"data.path={data}", "data.resolution=16",
                 "data.random_flip=true", "data.buckets=true", "data.bucket_step=4"]

    def cfg(cache: Path):
        return load_config("demo_lcm_lora", [*overrides, f"data.cache_dir={cache}"])

    build_cache(cfg(tmp_path / "one-a"), batch_size=4)  # the reference for A, before the launch changes an image
    two, snap = tmp_path / "two", tmp_path / "snap"
    snap.mkdir()
    proc = accelerate_launch(ROOT / "tests" / "_cache_phases.py", [str(snap), *overrides, f"data.cache_dir={two}"])
    assert (snap / "B.json").is_file(), proc.stderr[-3000:]
    assert proc.returncode != 0 and "simulated crash of rank 1 after writing its shard" in proc.stderr, proc.stderr[-6000:]

    # A: each process wrote shards, and the cache equals the one-process cache.
    assert {p.name.split("-")[2] for p in (snap / "A").glob("shard-*.safetensors")} == {"000", "001"}
    _assert_same_cache(cfg(snap / "A"), cfg(tmp_path / "one-a"))

    # B: only the changed image's two latents (both flips) were encoded; every other record is A's, untouched.
    report = json.loads((snap / "B.json").read_text())
    assert (report["latents_encoded"], report["texts_encoded"], report["damaged"]) == (2, 0, 0)
    ma, mb = read_manifest(snap / "A"), json.loads((snap / "B-manifest.json").read_text())
    changed = {v["latent"] for v in ma["items"][2]}
    assert {k: r for k, r in ma["records"].items() if k not in changed} == \
        {k: r for k, r in mb["records"].items() if k in ma["records"]}
    assert report["reused"] == len(mb["records"]) - 2

    # C crashed after rank 1 wrote a shard: the manifest is B's, byte for byte, C's shards are there but not named,
    # and the cache reads back equal to a one-process build of the same data.
    assert (two / MANIFEST).read_bytes() == (snap / "B-manifest.json").read_bytes()
    used = {r["shard"] for r in mb["records"].values()}
    orphans = [p for p in two.glob("shard-*.safetensors") if p.name not in used]
    assert {p.name.split("-")[1] for p in orphans} == {"000002"}  # run C's (A: 0, B: 1), from rank 1 and maybe 0
    assert "001" in {p.name.split("-")[2] for p in orphans}
    build_cache(cfg(tmp_path / "one-b"), batch_size=4)
    _assert_same_cache(cfg(two), cfg(tmp_path / "one-b"))

    # A later run (here one process) needs to encode nothing and clears what the crash left.
    healed = build_cache(cfg(two), batch_size=4)
    assert (healed.latents_encoded, healed.texts_encoded, healed.damaged) == (0, 0, 0)
    assert healed.shards_removed == len(orphans) and not list(two.glob(".tmp-*"))
    assert {p.name for p in two.glob("shard-*.safetensors")} == used
