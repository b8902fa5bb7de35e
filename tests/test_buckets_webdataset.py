"""Aspect-ratio buckets (one shape per batch, seedable order, size conditioning from the real sizes) and webdataset
tar shards (same items as the folder loader, broken samples skipped and counted)."""

import math

import pytest
import torch
import webdataset as wds

from lcm.data import BucketBatchSampler, build_dataset, build_loader, bucket_sizes, collate_fn, cover_size

from _helpers import data_cfg, png_bytes

SIZES = [(40, 20), (20, 40), (30, 30), (44, 22), (24, 36), (32, 32), (21, 42), (36, 24)]  # (w, h)


_png = png_bytes


def _folder(root):
    root.mkdir()
    for i, size in enumerate(SIZES):
        (root / f"{i:03d}.png").write_bytes(_png(size, i))
        (root / f"{i:03d}.txt").write_text(f"image {i}")
    return root


def test_bucket_table_respects_area_step_and_aspect():
    table = bucket_sizes(1024, 64, 2.0)
    assert (1024, 1024) in table and len(set(table)) == len(table)
    for h, w in table:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 and max(h, w) <= 2 * min(h, w)
        # the widest width for this height: one more step would pass the area
        assert h * (w + 64) > 1024**2


def test_buckets_give_one_shape_per_batch_and_real_size_conditioning(tmp_path):
    ds = build_dataset(data_cfg(_folder(tmp_path / "d"), resolution=16, buckets=True, bucket_step=4,
                                bucket_max_aspect=2.0))
    table = bucket_sizes(16, 4, 2.0)
    for i, (w, h) in enumerate(SIZES):
        item = ds[i]
        target = tuple(item["target_size"].tolist())
        # nearest bucket in log aspect ratio, and the pixels have its shape
        assert target == min(table, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(h / w)))
        assert item["pixel_values"].shape == (3, *target)
        assert item["original_size"].tolist() == [h, w]  # the real (h, w), not the bucket
        rh, rw = cover_size((h, w), target)
        assert item["crop_top_left"].tolist() == [(rh - target[0]) // 2, (rw - target[1]) // 2]
    assert len({tuple(t) for t in ds.buckets}) >= 3

    loader, sampler = build_loader(ds, collate_fn, batch_size=2, seed=3)
    seen = []
    for batch in loader:  # stacking would fail on mixed shapes
        assert len({tuple(t) for t in batch["target_size"].tolist()}) == 1
        seen += batch["index"].tolist()
    assert len(seen) == len(set(seen)) == 2 * len(sampler)
    # the order depends on (seed, epoch) only
    orders = []
    for seed, epoch in ((3, 0), (3, 0), (3, 1)):
        s = BucketBatchSampler(ds.buckets, 2, seed)
        s.set_epoch(epoch)
        orders.append(list(s))
    assert orders[0] == orders[1] and orders[0] != orders[2]


def _shards(root, broken=True):
    """Two tar shards written by webdataset's own TarWriter: png and jpg images with txt captions."""
    root.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(root / f"train-{shard:03d}.tar")) as sink:
            for i in range(shard * 4, shard * 4 + 4):
                sink.write({"__key__": f"{i:03d}", "png": _png(SIZES[i], i), "txt": f"image {i}"})
            if broken and shard == 1:
                sink.write({"__key__": "bad", "jpg": b"not a jpeg", "txt": "broken"})
                sink.write({"__key__": "textonly", "txt": "no image"})
                sink.write({"__key__": "nocap", "png": _png((20, 20), 99)})
    return root


def test_webdataset_shards_match_the_folder_loader(tmp_path):
    folder = build_dataset(data_cfg(_folder(tmp_path / "d"), resolution=16))
    shards = _shards(tmp_path / "s", broken=False)
    for path in (shards, str(shards / "train-{000..001}.tar")):  # a folder of shards, or a brace pattern
        ds = build_dataset(data_cfg(path, source="webdataset", resolution=16))
        assert len(ds) == len(folder) == len(SIZES)
        for i in range(len(ds)):
            a, b = ds[i], folder[i]
            assert a["caption"] == b["caption"]
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            assert torch.equal(a["original_size"], b["original_size"])


def test_webdataset_broken_samples_are_skipped_and_counted(tmp_path):
    ds = build_dataset(data_cfg(_shards(tmp_path / "s"), source="webdataset", resolution=16))
    s = ds.summary
    assert s.n_ok == len(SIZES) + 1 and s.n_skipped == {"unreadable": 1, "no_image": 1}
    assert s.n_missing_caption == 1
    assert all(ds[i]["pixel_values"].shape == (3, 16, 16) for i in range(len(ds)))
    (tmp_path / "s" / "train-000.tar").write_bytes(b"garbage")  # a whole shard unreadable: skipped, counted
    ds = build_dataset(data_cfg(tmp_path / "s", source="webdataset", resolution=16))
    assert ds.summary.n_skipped.get("unreadable_shard") == 1 and len(ds) == 5
    with pytest.raises(ValueError, match="train-002.tar does not exist"):
        build_dataset(data_cfg(str(tmp_path / "s" / "train-{000..009}.tar"), source="webdataset", resolution=16))
