"""lcm.data: folder + HF sources, bad-file handling, mode conversion, transforms, SDXL (h, w) conditioning."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from lcm.data import add_time_ids, build_dataset, collate_fn, format_summary, to_rgb
from lcm.errors import DataError

from _helpers import data_cfg


def make_cfg(path, **overrides):
    return data_cfg(path, **{"resolution": 32, **overrides})


def save_rgb(path, width=40, height=30, color=(200, 30, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def column_ramp(width, height):
    """RGB image whose red channel is its column index: any crop offset or flip is visible in the pixels."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    arr[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
    return arr


def to_uint8(pixel_values):
    """Invert the [-1, 1] scaling back to HWC uint8."""
    return ((pixel_values.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Captions


def test_txt_captions_recursive_and_missing_counted(tmp_path):
    save_rgb(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    save_rgb(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_text("nested jpeg")
    save_rgb(tmp_path / "c.webp")  # no caption
    ds = build_dataset(make_cfg(tmp_path))
    assert len(ds) == 3
    assert sorted(ds[i]["caption"] for i in range(3)) == ["", "a red square", "nested jpeg"]
    assert ds.summary.n_missing_caption == 1 and ds.summary.n_ok == 3


def test_metadata_jsonl_with_custom_caption_column(tmp_path):
    save_rgb(tmp_path / "x.png")
    save_rgb(tmp_path / "imgs" / "y.png")
    (tmp_path / "x.txt").write_text("ignored: metadata wins")
    rows = [{"file_name": "x.png", "prompt": "ex"}, {"file_name": "imgs/y.png", "prompt": "why"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_dataset(make_cfg(tmp_path, caption_column="prompt"))
    assert {ds.images[i].name: ds[i]["caption"] for i in range(len(ds))} == {"x.png": "ex", "y.png": "why"}
    assert ds.summary.n_missing_caption == 0


def test_metadata_csv_and_listed_but_absent_file(tmp_path):
    save_rgb(tmp_path / "x.png")
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["file_name", "text"], ["x.png", "a cross"], ["gone.png", "never there"]])
    ds = build_dataset(make_cfg(tmp_path))
    assert len(ds) == 1 and ds[0]["caption"] == "a cross"
    assert ds.summary.n_skipped == {"missing_file": 1}


def test_metadata_wrong_caption_column_is_named(tmp_path):
    save_rgb(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"'caption'.*available.*'text'"):
        build_dataset(make_cfg(tmp_path, caption_column="caption"))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def test_corrupt_and_empty_files_are_skipped_and_counted(tmp_path, caplog):
    save_rgb(tmp_path / "good1.png")
    save_rgb(tmp_path / "good2.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="lcm.data"):
        ds = build_dataset(make_cfg(tmp_path))
    assert len(ds) == 2
    assert sorted(p.name for p in ds.images) == ["good1.png", "good2.jpg"]
    assert ds.summary.n_skipped == {"unreadable": 1, "empty_file": 1}
    assert all(ds[i]["pixel_values"].shape == (3, 32, 32) for i in range(len(ds)))
    # The summary is logged exactly once, on one line.
    lines = [r.getMessage() for r in caplog.records if r.name == "lcm.data"]
    assert lines == [format_summary(ds.summary)] and "\n" not in lines[0]
    assert "2 images ok" in lines[0] and "empty_file=1" in lines[0] and "unreadable=1" in lines[0]


def test_decode_failure_after_indexing_falls_back_deterministically(tmp_path):
    for i in range(3):
        save_rgb(tmp_path / f"{i}.png", color=(i * 100, 0, 0))
    ds = build_dataset(make_cfg(tmp_path))
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # broken after the header scan
    item = ds[1]
    assert item["index"] == 2 and ds[1]["index"] == 2  # next index, every time
    assert ds.summary.n_decode_errors == 2
    assert ds[0]["index"] == 0


def test_empty_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        build_dataset(make_cfg(tmp_path))


def test_folder_with_only_bad_files_raises(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no usable image"):
        build_dataset(make_cfg(tmp_path))


def test_max_samples(tmp_path):
    for i in range(4):
        save_rgb(tmp_path / f"{i}.png")
    assert len(build_dataset(make_cfg(tmp_path, max_samples=2))) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Modes and pixel range


def test_rgba_composited_on_white_and_grey_to_three_channels(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent on the left half
    rgba[:, 16:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a_rgba.png")
    Image.new("L", (32, 32), 64).save(tmp_path / "b_grey.png")
    ds = build_dataset(make_cfg(tmp_path))
    px = to_uint8(ds[0]["pixel_values"])
    assert ds[0]["pixel_values"].shape == (3, 32, 32)
    assert (px[:, :16] == 255).all()  # transparent → white, not the hidden red
    assert (px[:, 16:] == (255, 0, 0)).all()
    grey = ds[1]["pixel_values"]
    assert grey.shape == (3, 32, 32) and grey.dtype == torch.float32
    assert (to_uint8(grey) == 64).all()


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)), (128, 128, 128)),  # I;16: rescaled, not clipped
        (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("P", (8, 8), 0), (0, 0, 0)),
        (Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
    ],
    ids=["I;16", "CMYK", "P", "LA"],
)
def test_to_rgb_modes(image, expected):
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert np.array(out)[0, 0].tolist() == list(expected)


def test_pixel_range_and_dtype(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    arr[0, 0], arr[0, 1] = 0, 255
    Image.fromarray(arr).save(tmp_path / "noise.png")
    px = build_dataset(make_cfg(tmp_path, resolution=48))[0]["pixel_values"]
    assert px.dtype == torch.float32 and px.shape == (3, 48, 48)
    assert px.min() == -1.0 and px.max() == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# SDXL conditioning and crops


def test_center_crop_conditioning_is_height_width(tmp_path):
    save_rgb(tmp_path / "wide.png", width=300, height=200)
    item = build_dataset(make_cfg(tmp_path, resolution=128))[0]
    # Shorter side 200 → 128 scales 300 → 192; centre crop of 128 from 192 starts at (192 - 128) // 2 = 32.
    assert item["original_size"].tolist() == [200, 300]
    assert item["crop_top_left"].tolist() == [0, 32]
    assert item["target_size"].tolist() == [128, 128]
    assert item["original_size"].dtype == torch.long and item["crop_top_left"].shape == (2,)
    tall = tmp_path / "tall"
    save_rgb(tall / "tall.png", width=200, height=300)
    assert build_dataset(make_cfg(tall, resolution=128))[0]["crop_top_left"].tolist() == [32, 0]


def test_random_crop_is_seeded_in_bounds_and_matches_pixels(tmp_path):
    Image.fromarray(column_ramp(96, 32)).save(tmp_path / "ramp.png")  # shorter side already 32: no resize
    orig = column_ramp(96, 32)

    def crops(seed):
        ds = build_dataset(make_cfg(tmp_path, center_crop=False), seed=seed)
        out = []
        for epoch in range(12):
            ds.set_epoch(epoch)
            item = ds[0]
            top, left = item["crop_top_left"].tolist()
            assert top == 0 and 0 <= left <= 96 - 32
            np.testing.assert_array_equal(to_uint8(item["pixel_values"]), orig[:, left:left + 32])
            out.append((left, item["pixel_values"]))
        return out

    a, b, c = crops(7), crops(7), crops(8)
    assert [l for l, _ in a] == [l for l, _ in b]
    assert all(torch.equal(pa, pb) for (_, pa), (_, pb) in zip(a, b))
    assert len({l for l, _ in a}) > 3  # the offset actually varies across epochs
    assert [l for l, _ in a] != [l for l, _ in c]  # and depends on the seed


def test_flip_mirrors_crop_left(tmp_path):
    orig = column_ramp(96, 32)
    Image.fromarray(orig).save(tmp_path / "ramp.png")
    ds = build_dataset(make_cfg(tmp_path, center_crop=False, random_flip=True), seed=0)
    flipped = plain = 0
    for epoch in range(24):
        ds.set_epoch(epoch)
        item = ds[0]
        top, left = item["crop_top_left"].tolist()
        px = to_uint8(item["pixel_values"])
        # The reported left is in the coordinates of the image the model saw: flipped image for flipped items.
        if np.array_equal(px, orig[:, left:left + 32]):
            plain += 1
        else:
            np.testing.assert_array_equal(px, orig[:, ::-1][:, left:left + 32])
            flipped += 1
    assert flipped > 0 and plain > 0


def test_collate_and_add_time_ids(tmp_path):
    save_rgb(tmp_path / "a.png", width=60, height=40)
    (tmp_path / "a.txt").write_text("first")
    save_rgb(tmp_path / "b.png", width=40, height=50)
    ds = build_dataset(make_cfg(tmp_path))
    batch = collate_fn([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["caption"] == ["first", ""]
    assert batch["index"].tolist() == [0, 1]
    time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
    assert time_ids.shape == (2, 6)
    # [orig_h, orig_w, crop_top, crop_left, target_h, target_w]: 60x40 → 48x32, centre left 8; 40x50 → 32x40, top 4.
    assert time_ids.tolist() == [[40, 60, 0, 8, 32, 32], [50, 40, 4, 0, 32, 32]]
    assert add_time_ids(ds[0]["original_size"], ds[0]["crop_top_left"], ds[0]["target_size"]).shape == (1, 6)


# ---------------------------------------------------------------------------------------------------------------------
# HF datasets


def _save_hf(tmp_path, as_dict=False):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (48, 32), (i * 60, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"picture": images + [{"bytes": b"not an image", "path": None}], "prompt": ["p0", "p1", None, "p3"]},
        features=datasets.Features({"picture": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    path = tmp_path / "saved"
    (datasets.DatasetDict({"validation": ds}) if as_dict else ds).save_to_disk(str(path))
    return path


def test_hf_save_to_disk_custom_columns(tmp_path):
    path = _save_hf(tmp_path)
    ds = build_dataset(make_cfg(path, source="hf", image_column="picture", caption_column="prompt"))
    assert len(ds) == 3
    assert [ds[i]["caption"] for i in range(3)] == ["p0", "p1", ""]
    assert ds[1]["original_size"].tolist() == [32, 48]
    assert to_uint8(ds[1]["pixel_values"])[0, 0].tolist() == [60, 0, 0]
    assert ds.summary.n_skipped == {"unreadable": 1} and ds.summary.n_missing_caption == 1


def test_hf_dataset_dict_split(tmp_path):
    path = _save_hf(tmp_path, as_dict=True)
    cfg = make_cfg(path, source="hf", image_column="picture", caption_column="prompt", split="validation")
    assert len(build_dataset(cfg)) == 3
    with pytest.raises(ValueError, match=r"'train'.*validation"):
        build_dataset(make_cfg(path, source="hf", image_column="picture", caption_column="prompt"))


def test_hf_wrong_column_is_named(tmp_path):
    path = _save_hf(tmp_path)
    with pytest.raises(ValueError, match=r"'image'.*available.*picture"):
        build_dataset(make_cfg(path, source="hf", caption_column="prompt"))
    with pytest.raises(ValueError, match=r"'text'.*available.*prompt"):
        build_dataset(make_cfg(path, source="hf", image_column="picture"))


def test_hf_imagefolder_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # keep the user cache clean
    folder = tmp_path / "imgs"
    for i in range(2):
        save_rgb(folder / f"{i}.png", color=(i * 90, 0, 0))
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"t{i}"}) + "\n"
                                                   for i in range(2)))
    ds = build_dataset(make_cfg(folder, source="hf"))
    assert sorted(ds[i]["caption"] for i in range(2)) == ["t0", "t1"]


def test_unknown_source_lists_choices(tmp_path):
    with pytest.raises(ValueError, match=r"'s3'.*folder.*hf"):
        build_dataset(make_cfg(tmp_path, source="s3"))


# --- folder edges (issue 14 item 4) -------------------------------------------------------------------------------


def _save_animated_gif(path):
    frames = [Image.new("P", (32, 32), i) for i in (1, 2)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def test_animated_gif_is_unsupported_format_not_missing(tmp_path):
    """A GIF listed in metadata.jsonl exists: it was counted as missing_file. GIFs are not read (convert to PNG)."""
    save_rgb(tmp_path / "a.png")
    _save_animated_gif(tmp_path / "anim.gif")
    _save_animated_gif(tmp_path / "unlisted.gif")
    rows = [{"file_name": "a.png", "text": "a"}, {"file_name": "anim.gif", "text": "moving"},
            {"file_name": "gone.png", "text": "absent"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_dataset(make_cfg(tmp_path))
    assert [p.name for p in ds.images] == ["a.png"]
    assert ds.summary.n_skipped == {"unsupported_format": 2, "missing_file": 1}
    assert "unsupported_format=2" in format_summary(ds.summary)


def test_folder_of_only_gifs_says_so(tmp_path):
    _save_animated_gif(tmp_path / "anim.gif")
    with pytest.raises(DataError, match=r"no images .*1 file\(s\) in unsupported formats, e\.g\. anim\.gif"):
        build_dataset(make_cfg(tmp_path))


def test_duplicate_metadata_rows_are_counted_and_the_winner_named(tmp_path, caplog):
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "b.png")
    rows = [{"file_name": "a.png", "text": "first a"}, {"file_name": "./a.png", "text": "second a"},
            {"file_name": "b.png", "text": "first b"}, {"file_name": "b.png", "text": "second b"},
            {"file_name": "sub/../b.png", "text": "third b"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="lcm.data"):
        ds = build_dataset(make_cfg(tmp_path))
    assert {ds.images[i].name: ds.captions[i] for i in range(len(ds))} == {"a.png": "second a", "b.png": "third b"}
    s = ds.summary
    assert s.n_duplicate_rows == 3 and s.duplicate_winners == {"a.png": 2, "b.png": 5} and not s.n_skipped
    line = format_summary(s)
    assert "3 duplicate metadata row(s) overridden (the last row wins: a.png from line 2, b.png from line 5)" in line
    assert "a.png (line 2: 'second a')" in caplog.text


@pytest.mark.parametrize("follow", [True, False])
def test_symlink_to_outside_the_folder_is_counted_and_refusable(tmp_path, follow):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    save_rgb(root / "a.png")
    save_rgb(root / "sub" / "inside.png")
    save_rgb(elsewhere / "b.png")
    (root / "link_out.png").symlink_to(elsewhere / "b.png")
    (root / "link_in.png").symlink_to(root / "sub" / "inside.png")  # inside the folder: not this rule's business
    ds = build_dataset(make_cfg(root, follow_symlinks=follow))
    names = sorted(p.name for p in ds.images)
    if follow:
        assert names == ["a.png", "inside.png", "link_in.png", "link_out.png"]
        assert ds.summary.n_symlinks_outside == 1 and not ds.summary.n_skipped
        assert "1 symlink(s) to files outside the folder followed" in format_summary(ds.summary)
    else:
        assert names == ["a.png", "inside.png", "link_in.png"]
        assert ds.summary.n_skipped == {"symlink_outside": 1} and ds.summary.n_symlinks_outside == 0
