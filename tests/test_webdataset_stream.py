"""Streaming webdataset shards (`pipe:`, `file://`, .tar.gz): the same items as the random-access index, broken input
skipped and counted, disjoint shards per rank and worker, a (seed, epoch)-determined order, exact mid-epoch resume
without decoding the skipped batches, refusals that name the key, and a tiny LCM-LoRA run trained from a `pipe:`."""

import gzip
import io
import shutil
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

import lcm.data.stream
from lcm.cache import CacheError, build_cache
from lcm.config import ConfigError, load_config
from lcm.data import build_dataset, build_loader, collate_fn, is_streaming

from _helpers import ROOT, accelerate_launch, data_cfg, load_entry_script, png_bytes

SIZES = [(40, 20), (20, 40), (30, 30), (44, 22), (24, 36), (32, 32), (21, 42), (36, 24)]  # (w, h), 2 per shard
ITEM_KEYS = ("pixel_values", "original_size", "crop_top_left", "target_size")


def _write_shards(root, n_shards=4, per_shard=2, extra=None):
    """`n_shards` tar shards of `per_shard` png + txt samples (keys 000, 001, … in shard order); `extra` maps a shard
    number to more raw samples appended to it."""
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        with wds.TarWriter(str(root / f"train-{shard:03d}.tar")) as sink:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                sink.write({"__key__": f"{i:03d}", "png": png_bytes(SIZES[i % len(SIZES)], i), "txt": f"image {i}"})
            for sample in (extra or {}).get(shard, []):
                sink.write(sample)
    return root


def _gzip_copies(root, out):
    """The same shards as .tar.gz (streamable only)."""
    out.mkdir()
    for tar in sorted(root.glob("*.tar")):
        (out / f"{tar.stem}.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
    return out


def _stream(path, seed=0, **overrides):
    kw = dict(source="webdataset", resolution=16, num_samples=8, shuffle_buffer=0)
    return build_dataset(data_cfg(path, **{**kw, **overrides}), seed=seed)


def _epoch(ds, batch_size=1, epoch=0, rank=0, world_size=1, num_workers=0, skip=0, accumulation=1):
    """One rank's epoch as a list of collated batches."""
    ds.set_epoch(epoch)
    loader, _ = build_loader(ds, collate_fn, batch_size, 0, num_workers, rank=rank, world_size=world_size,
                             accumulation=accumulation)
    loader.dataset.skip = skip
    return list(loader)


def _keys(batches):
    """Sample keys (without the shard URL) in stream order."""
    return [k.rsplit("/", 1)[1] for b in batches for k in b["key"]]


def test_streaming_is_chosen_for_urls_pipes_and_compressed_shards(tmp_path):
    shards = _write_shards(tmp_path / "s")
    local = str(shards / "train-{000..003}.tar")
    assert not is_streaming(data_cfg(shards, source="webdataset"))  # local .tar: random access, as before
    assert not is_streaming(data_cfg(local, source="webdataset"))
    assert not is_streaming(data_cfg("pipe:cat x.tar", source="folder"))
    for spec in (f"pipe:cat {local}", "https://host/shards/{000..099}.tar", f"file://{local}"):
        assert is_streaming(data_cfg(spec, source="webdataset"))
    assert is_streaming(data_cfg(local, source="webdataset", streaming=True))
    gz = _gzip_copies(shards, tmp_path / "gz")
    assert is_streaming(data_cfg(gz, source="webdataset"))  # a folder of .tar.gz
    assert is_streaming(data_cfg(str(gz / "train-{000..003}.tar.gz"), source="webdataset"))


@pytest.mark.parametrize("kind", ["pipe", "file", "gzip"])
def test_streamed_items_equal_the_random_access_items(tmp_path, kind):
    shards = _write_shards(tmp_path / "s")
    indexed = build_dataset(data_cfg(shards, source="webdataset", resolution=16))
    reference = {m.name.split(".")[0]: indexed[i] for i, m in enumerate(indexed.images)}
    pattern = "train-{000..003}.tar"
    spec = {"pipe": f"pipe:cat {shards}/{pattern}", "file": f"file://{shards}/{pattern}",
            "gzip": str(_gzip_copies(shards, tmp_path / "gz") / f"{pattern}.gz")}[kind]
    batches = _epoch(_stream(spec, shuffle_buffer=4))
    assert sorted(_keys(batches)) == sorted(reference)  # one epoch of num_samples = every sample once
    for batch in batches:
        ref = reference[_keys([batch])[0]]
        assert batch["caption"] == [ref["caption"]]
        for k in ITEM_KEYS:
            assert torch.equal(batch[k][0], ref[k]), k


def test_streamed_buckets_batch_per_bucket_with_the_indexed_conditioning(tmp_path):
    shards = _write_shards(tmp_path / "s")
    kw = dict(resolution=16, buckets=True, bucket_step=4)
    indexed = build_dataset(data_cfg(shards, source="webdataset", **kw))
    reference = {m.name.split(".")[0]: indexed[i] for i, m in enumerate(indexed.images)}
    # 8 samples in batches of 2: a bucket's batch goes out when it is full; buckets of 1 wait for the next pass.
    batches = _epoch(_stream(f"pipe:cat {shards}/train-{{000..003}}.tar", streaming=True, **kw), batch_size=2)
    assert len(batches) == 4
    for batch in batches:  # stacking would have failed on mixed shapes
        assert len({tuple(t) for t in batch["target_size"].tolist()}) == 1
        for row, key in enumerate(_keys([batch])):
            for k in ITEM_KEYS:
                assert torch.equal(batch[k][row], reference[key][k]), k


def test_broken_samples_and_shards_are_skipped_and_counted(tmp_path, caplog):
    extra = {1: [{"__key__": "bad", "jpg": b"not a jpeg", "txt": "broken"},
                 {"__key__": "textonly", "txt": "no image"},
                 {"__key__": "nocap", "png": png_bytes((20, 20), 99)},
                 {"__key__": "latin1", "png": png_bytes((20, 20), 98), "txt": "caf\xe9".encode("latin-1")}]}
    shards = _write_shards(tmp_path / "s", n_shards=2, extra=extra)
    spec = f"pipe:cat {shards}/train-{{000..001}}.tar::pipe:cat {shards}/missing.tar"  # a third, unreadable shard
    ds = _stream(spec, num_samples=6, streaming=True)
    assert sorted(_keys(_epoch(ds))) == ["000", "001", "002", "003", "latin1", "nocap"]
    ds = _stream(spec, num_samples=6, streaming=True)
    assert len(list(ds._read(ds.urls))) == 6  # one whole pass (an epoch may end before the missing shard's turn)
    s = ds.summary
    assert s.n_skipped == {"unreadable": 1, "no_image": 1, "unreadable_shard": 1}
    assert (s.n_ok, s.n_missing_caption, s.n_caption_not_utf8) == (6, 1, 1)
    assert "missing.tar" in caplog.text

    # Nothing readable at all: the run stops, naming data.path.
    dead = f"pipe:cat {tmp_path}/none-{{0..1}}.tar"
    with pytest.raises(ValueError, match="no usable sample") as err:
        _epoch(_stream(dead))
    assert dead in str(err.value)


def test_a_sample_that_fails_to_decode_is_replaced_within_its_batch(tmp_path):
    noise = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise.numpy()).save(buf, format="JPEG")
    truncated = buf.getvalue()[:-400]  # the header check passes, decoding fails
    shards = _write_shards(tmp_path / "s", n_shards=1, per_shard=0,
                           extra={0: [{"__key__": "cut", "jpg": truncated, "txt": "cut"},
                                      {"__key__": "good", "png": png_bytes((20, 20), 7), "txt": "good"}]})
    ds = _stream(shards, num_samples=2, streaming=True)
    (batch,) = _epoch(ds, batch_size=2)
    assert batch["caption"] == ["good", "good"] and torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    assert ds.summary.n_decode_errors == 1


def test_ranks_and_workers_read_disjoint_shards_that_cover_everything(tmp_path):
    shards = _write_shards(tmp_path / "s")
    ds = _stream(f"pipe:cat {shards}/train-{{000..003}}.tar", shuffle_buffer=3)
    lists = [ds.shards(rank, 2, worker, 2) for rank in range(2) for worker in range(2)]
    assert all(len(x) == 1 for x in lists) and sorted(sum(lists, [])) == sorted(ds.urls)
    per_rank = [_keys(_epoch(ds, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # equal batch counts: DDP ranks must step together
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(sum(per_rank, [])) == [f"{i:03d}" for i in range(8)]
    # Two real DataLoader workers: their batches arrive round-robin, worker 0 first, as `batches` assumes.
    by_worker = [_keys(map(collate_fn, ds.batches(0, 2, w, 2, 1, 4))) for w in range(2)]
    assert _keys(_epoch(ds, world_size=2, num_workers=2)) == [by_worker[j % 2][j // 2] for j in range(4)]
    with pytest.raises(ValueError, match="data.num_workers=3"):
        _epoch(ds, world_size=2, num_workers=3)  # 6 readers, 4 shards


def test_order_is_fixed_by_seed_and_epoch(tmp_path):
    shards = _write_shards(tmp_path / "s")
    spec = f"pipe:cat {shards}/train-{{000..003}}.tar"
    orders = {(seed, epoch): _keys(_epoch(_stream(spec, shuffle_buffer=4, seed=seed), epoch=epoch))
              for seed, epoch in [(0, 0), (0, 1), (1, 0)]}
    assert _keys(_epoch(_stream(spec, shuffle_buffer=4, seed=0), epoch=0)) == orders[0, 0]
    assert orders[0, 0] != orders[0, 1] and orders[0, 0] != orders[1, 0]
    assert all(sorted(o) == sorted(orders[0, 0]) for o in orders.values())


def test_shard_order_alone_is_shuffled_per_seed_and_epoch(tmp_path):
    """Without the sample buffer the stream reads whole shards in turn: their order is the (seed, epoch) shuffle."""
    shards = _write_shards(tmp_path / "s")
    spec = f"pipe:cat {shards}/train-{{000..003}}.tar"

    def shard_order(seed, epoch):
        keys = [k.rsplit("/", 1)[0] for b in _epoch(_stream(spec, seed=seed), epoch=epoch) for k in b["key"]]
        return list(dict.fromkeys(keys))  # shards in the order they were first read

    orders = [shard_order(0, epoch) for epoch in range(6)]
    assert all(sorted(o) == sorted(orders[0]) and len(o) == 4 for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # the order moves with the epoch (6 equal draws of 24: ~2e-7)
    assert shard_order(0, 3) == orders[3]  # repeatable
    assert any(shard_order(seed, 3) != orders[3] for seed in (1, 2, 3))  # and the seed matters


def test_resume_skips_consumed_batches_without_decoding_them(tmp_path, monkeypatch):
    shards = _write_shards(tmp_path / "s")
    ds = _stream(f"pipe:cat {shards}/train-{{000..003}}.tar", num_samples=16, shuffle_buffer=3, buckets=True,
                 bucket_step=4, center_crop=False, random_flip=True)
    full = _epoch(ds, batch_size=2, epoch=1)  # 16 samples = 8 batches: the stream passes its shards twice
    decoded = []
    monkeypatch.setattr(lcm.data.stream, "load_image", lambda ref: decoded.append(ref) or Image.open(io.BytesIO(ref)).convert("RGB"))
    tail = _epoch(ds, batch_size=2, epoch=1, skip=5)
    assert len(decoded) == 2 * 3  # only the 3 batches it yields
    assert len(tail) == 3
    for a, b in zip(tail, full[5:]):
        assert a["key"] == b["key"] and all(torch.equal(a[k], b[k]) for k in ITEM_KEYS)


def test_stream_refusals_name_the_key(tmp_path):
    shards = _write_shards(tmp_path / "s")
    spec = f"pipe:cat {shards}/train-{{000..003}}.tar"
    with pytest.raises(ValueError, match="data.num_samples is required"):
        build_dataset(data_cfg(spec, source="webdataset"))
    with pytest.raises(ValueError, match="pipe:aws s3 cp s3://bucket/a.tar -"):
        _stream("s3://bucket/{a,b}.tar")
    with pytest.raises(ValueError, match="missing.tar does not exist"):
        _stream(f"file://{shards}/missing.tar")
    with pytest.raises(ValueError, match="data.num_samples=8 is less than one optimiser step"):
        _epoch(_stream(spec), batch_size=4, world_size=2, accumulation=2)
    with pytest.raises(ConfigError, match="data.streaming=true needs data.source=webdataset"):
        load_config("demo_lcm_lora", ["model.pretrained=x", "data.path=x", "data.streaming=true"])
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        load_config("demo_lcm_lora", ["model.pretrained=x", "data.path=x", "data.shuffle_buffer=-1"])
    cfg = load_config("demo_lcm_lora", ["model.pretrained=x", f"data.path={spec}", "data.source=webdataset",
                                        "data.num_samples=8", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(CacheError, match="use local uncompressed .tar shards"):
        build_cache(cfg)


def _train_args(teacher, data, out, *extra):
    return ["--config", "demo_lcm_lora", f"model.pretrained={teacher}", "data.source=webdataset", f"data.path={data}",
            "data.num_samples=8", "data.shuffle_buffer=3", "data.center_crop=false", "data.random_flip=true",
            f"train.output_dir={out}", "data.resolution=16", "train.batch_size=1", "train.gradient_accumulation_steps=2",
            "train.report_to=none", "lora.rank=4", "lora.alpha=4", "validation.every_n_steps=0", *extra]


def _uninterrupted_and_resumed(script: str, args, tmp_path, weights: str):
    """`weights` of a 3-step run, and of a run stopped after step 1 (checkpointed) then resumed to step 3: an epoch is
    8 samples / (batch 1 × accumulation 2) = 4 steps, so the resume replays the epoch's stream and skips 2 batches.
    `args(out, *extra)` is the script's command line."""
    train = load_entry_script(script)
    assert train.main(args(tmp_path / "ref", "train.max_train_steps=3", "train.checkpoint_every=0")) == 0
    cut = tmp_path / "cut"
    assert train.main(args(cut, "train.max_train_steps=1", "train.checkpoint_every=1")) == 0
    shutil.rmtree(cut / "final")
    assert train.main(args(cut, "train.max_train_steps=3", "train.checkpoint_every=0", "--resume", "latest")) == 0
    ref, resumed = load_file(tmp_path / "ref" / weights), load_file(cut / weights)
    assert ref.keys() == resumed.keys()
    return ref, resumed


def test_lora_trains_from_a_pipe_stream_and_resumes_mid_epoch_exactly(tiny_sdxl_dir, tmp_path):
    """A LoRA run stopped mid-epoch and resumed ends with the same LoRA bits as an uninterrupted run."""
    shards = _write_shards(tmp_path / "s")
    data = f"pipe:cat {shards}/train-{{000..003}}.tar"
    ref, resumed = _uninterrupted_and_resumed(
        "train_lcm_lora", lambda out, *extra: _train_args(tiny_sdxl_dir, data, out, *extra), tmp_path,
        "final/pytorch_lora_weights.safetensors")
    assert any(ref[k].abs().max() > 0 for k in ref if "lora_B" in k)  # it trained
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)


def test_full_lcd_trains_from_a_stream_and_resumes_mid_epoch_exactly(tiny_sdxl_dir, tmp_path):
    """train_lcd.py (whole UNet + EMA target) on a `pipe:` stream: a run stopped mid-epoch and resumed exports the
    same UNet bits as an uninterrupted run, and the exported UNet moved away from the teacher's."""
    shards = _write_shards(tmp_path / "s")
    data = f"pipe:cat {shards}/train-{{000..003}}.tar"

    def args(out, *extra):
        return ["--config", "lcd_sdxl", f"model.pretrained={tiny_sdxl_dir}", "data.source=webdataset",
                f"data.path={data}", "data.num_samples=8", "data.shuffle_buffer=3", "data.resolution=16",
                f"train.output_dir={out}", "train.batch_size=1", "train.gradient_accumulation_steps=2",
                "train.mixed_precision=no", "train.gradient_checkpointing=false", "train.report_to=none",
                "validation.every_n_steps=0", "distill.w_embed_dim=32", "optim.lr=1e-3", *extra]

    weights = "unet/diffusion_pytorch_model.safetensors"
    ref, resumed = _uninterrupted_and_resumed("train_lcd", args, tmp_path, f"final/{weights}")
    teacher = load_file(Path(tiny_sdxl_dir) / weights)
    assert any(not torch.equal(ref[k], teacher[k]) for k in teacher)  # it trained
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)


@pytest.mark.slow  # three 2-rank launches, ~40 s
def test_two_ranks_with_two_workers_each_resume_a_stream_exactly(tiny_sdxl_dir, tmp_path):
    """2 ranks × 2 loader workers read the 4 shards disjointly (one each); an epoch is 8 samples / 2 ranks = 4 steps.
    Stopping at step 3 and resuming to 6 (mid-epoch 0, then through epoch 1) gives the uninterrupted run's bits."""
    shards = _write_shards(tmp_path / "s")
    data = f"pipe:cat {shards}/train-{{000..003}}.tar"
    common = ("data.num_workers=2", "train.gradient_accumulation_steps=1")
    runs = [("ref", "train.max_train_steps=6", "train.checkpoint_every=0"),
            ("cut", "train.max_train_steps=3", "train.checkpoint_every=3"),
            ("cut", "train.max_train_steps=6", "train.checkpoint_every=0", "--resume", "latest")]
    for out, *extra in runs:
        args = _train_args(tiny_sdxl_dir, data, tmp_path / out, *common, *extra)
        proc = accelerate_launch(ROOT / "train_lcm_lora.py", args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "rank 1, worker 1" in proc.stderr
    weights = "final/pytorch_lora_weights.safetensors"
    ref, resumed = load_file(tmp_path / "ref" / weights), load_file(tmp_path / "cut" / weights)
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)
