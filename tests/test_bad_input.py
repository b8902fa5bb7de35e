"""A corpus of bad input, generated here: each file is skipped (or converted) and counted, the summary is printed
before training, an unusable folder fails before any model loads, and a file that only fails on full decode falls
back during a real training run instead of crashing it."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from lcm.data import build_dataset, check_image, format_summary, load_image
from lcm.tiny import make_captioned_image_folder

from _helpers import data_cfg, load_entry_script

ROOT = Path(__file__).resolve().parents[1]
RES = 16  # training resolution for the corpus; every good image is at least this big except small.png


def _cfg(path, **overrides):
    return data_cfg(path, **{"resolution": RES, **overrides})


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes = b"") -> bytes:
    """A PNG written by hand: any header (even one claiming 10^10 pixels) around the given filtered rows."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows or b"\0" * 16))
            + _chunk(b"IEND", b""))


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(size=24, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def make_bad_corpus(root: Path) -> Path:
    """Every kind of bad input next to a few good images; captions in .txt files and a metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "empty.png": b"",                                                  # zero bytes
        "truncated.png": _encoded(_noise(), "PNG")[:300],                  # cut mid-IDAT: the chunk scan fails
        "truncated.jpg": _encoded(_noise(seed=1), "JPEG")[:-400],          # header fine, scan data cut: decode fails
        "text.png": b"just some text, not an image\n" * 4,                 # a text file with an image name
        "bomb.png": png_bytes(100_000, 100_000, 8, 2),                     # 10^10 px: PIL raises at open
        "bomb_warn.png": png_bytes(10_000, 10_000, 8, 2),                  # 10^8 px: PIL only warns, then would decode
        # 16-bit RGB (PIL reads it as 8-bit RGB) and 16-bit grey (mode I;16, rescaled by to_rgb).
        "deep_rgb.png": png_bytes(RES, RES, 16, 2, (b"\0" + struct.pack(">HHH", 65535, 32896, 0) * RES) * RES),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    Image.fromarray(np.full((RES, RES), 32896, dtype=np.uint16)).save(root / "deep_grey.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)  # red in CMYK
    rgba = np.zeros((RES, RES, 4), dtype=np.uint8)
    rgba[..., 2] = 255  # blue everywhere, opaque only on the right half
    rgba[:, RES // 2:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.new("L", (20, 18), 100).save(root / "grey.png")
    Image.new("RGB", (8, 6), (0, 200, 0)).save(root / "small.png")  # smaller than the crop: upscaled
    _noise(seed=2).save(root / "no_caption.png")
    _noise(seed=3).save(root / "latin1.png")
    _noise(seed=4).save(root / "bom.png")
    for name in ("truncated", "deep_rgb", "deep_grey", "cmyk", "rgba", "grey", "small"):
        (root / f"{name}.txt").write_text(f"a {name} picture", encoding="utf-8")
    (root / "latin1.txt").write_bytes("a café picture".encode("latin-1"))  # not UTF-8
    (root / "bom.txt").write_bytes("\ufeffa bom picture".encode("utf-8"))  # UTF-8 with a byte-order mark
    make_captioned_image_folder(root / "shapes", n=2, size=RES)  # .txt captions; metadata below overrides one
    lines = [json.dumps({"file_name": "shapes/0000.png", "text": "from metadata"}),
             "",  # blank lines are not errors
             '{"file_name": "shapes/0001.png", "text": ',  # line 3: broken JSON
             json.dumps({"file_name": "missing.png", "text": "listed but absent"}),
             json.dumps({"text": "no file name"})]  # line 5
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


GOOD = {"truncated.jpg", "deep_rgb.png", "deep_grey.png", "cmyk.jpg", "rgba.png", "grey.png", "small.png",
        "no_caption.png", "latin1.png", "bom.png", "0000.png", "0001.png"}


@pytest.fixture
def corpus(tmp_path):
    return make_bad_corpus(tmp_path / "corpus")


def test_corpus_is_skipped_converted_and_counted(corpus, monkeypatch):
    # A decompression bomb must be refused from its header, never decoded: fail loudly if PIL starts decoding one.
    real_load = ImageFile.ImageFile.load

    def guarded_load(image):
        assert image.size[0] * image.size[1] < 10**6, f"decoding a {image.size} image"
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded_load)
    ds = build_dataset(_cfg(corpus))
    s = ds.summary
    assert {p.name for p in ds.images} == GOOD
    assert s.n_skipped == {"empty_file": 1, "unreadable": 2, "too_large": 2, "missing_file": 1}
    assert s.n_ok == len(GOOD) and s.n_upscaled == 1 and s.n_missing_caption == 1 and s.n_caption_not_utf8 == 1
    assert s.bad_metadata_lines == [3, 5]
    line = format_summary(s)
    assert "12 images ok, 6 skipped" in line and "too_large=2" in line and "1 upscaled" in line
    assert "2 bad metadata line(s) skipped (line 3, 5)" in line and "1 caption(s) not UTF-8" in line

    item = {p.name: ds[i] for i, p in enumerate(ds.images) if p.name != "truncated.jpg"}
    captions = {name: it["caption"] for name, it in item.items()}
    assert captions["latin1.png"] == "a caf\ufffd picture"  # decoded with replacement, not dropped
    assert captions["bom.png"] == "a bom picture" and captions["no_caption.png"] == ""
    assert captions["0000.png"] == "from metadata"
    txt = (corpus / "shapes/0001.txt").read_text().strip()
    assert captions["0001.png"] == txt  # its metadata line was bad: the .txt caption is used instead
    for name, it in item.items():
        assert it["pixel_values"].shape == (3, RES, RES), name
    px = {name: ((it["pixel_values"] + 1) * 127.5).round() for name, it in item.items()}
    assert px["deep_rgb.png"][:, 0, 0].tolist() == [255, 128, 0]  # 16-bit samples scaled, not clipped
    assert px["deep_grey.png"][:, 0, 0].tolist() == [128, 128, 128]
    assert (px["cmyk.jpg"][0] > 200).all() and (px["cmyk.jpg"][1:] < 60).all()  # CMYK red → RGB red
    assert (px["rgba.png"][:, :, : RES // 2] == 255).all()  # the transparent half composited on white
    assert px["rgba.png"][:, 0, -1].tolist() == [0, 0, 255]  # the opaque half keeps its blue
    assert (px["grey.png"] == 100).all()
    assert (px["small.png"][1] == 200).all() and item["small.png"]["original_size"].tolist() == [6, 8]


def test_bomb_headers_are_refused_without_decoding(tmp_path):
    for w, h in ((100_000, 100_000), (10_000, 10_000)):  # above 2x the limit (PIL error) and between 1x and 2x (warning)
        data = png_bytes(w, h, 8, 2)
        assert check_image(data) == "too_large"
        with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
            load_image(data)  # also refused at load time, should the file change after indexing


def test_extreme_aspect_ratio_is_too_large_after_resize(tmp_path, monkeypatch):
    # A 2 x 600 strip is tiny, but its short side scaled to 32 px makes a 32 x 9600 image before the crop.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    Image.new("RGB", (2, 600)).save(tmp_path / "strip.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    ds = build_dataset(_cfg(tmp_path, resolution=32))
    assert [p.name for p in ds.images] == ["ok.png"] and ds.summary.n_skipped == {"too_large": 1}


def test_metadata_csv_bad_row_line_is_named(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"a, quoted"\n,no file\nb.png,x,extra\n')
    ds = build_dataset(_cfg(tmp_path))
    assert ds[0]["caption"] == "a, quoted" and ds.summary.bad_metadata_lines == [3, 4]


def _train_script():
    return load_entry_script("train_lcm_lora")

def _args(teacher, data, out, *extra):
    return ["--config", "demo_lcm_lora", f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={out}",
            f"data.resolution={RES}", "train.batch_size=2", "train.report_to=none", "lora.rank=4", "lora.alpha=4",
            "validation.every_n_steps=0", "train.checkpoint_every=0", *extra]


@pytest.mark.parametrize("case", ["empty", "all_bad", "fewer_than_batch"])
def test_unusable_dataset_fails_before_any_model_loads(case, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    if case == "all_bad":
        (data / "a.png").write_bytes(b"")
        (data / "b.jpg").write_bytes(b"not a jpeg")
    if case == "fewer_than_batch":
        Image.new("RGB", (20, 20)).save(data / "only.png")
    train = _train_script()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for an unusable dataset")

    monkeypatch.setattr("lcm.entry.load_pipeline", no_model)  # where the entry scripts' set-up loads the teacher
    message = {"empty": "no images", "all_bad": "no usable image", "fewer_than_batch": "fewer than train.batch_size"}
    with pytest.raises(ValueError, match=message[case]):
        train.main(_args(tmp_path / "no-teacher", data, tmp_path / "run", "train.max_train_steps=1"))


def test_training_on_the_corpus_survives_a_file_that_fails_on_full_decode(corpus, tiny_sdxl_dir, tmp_path, capsys):
    """12 usable files, batch 2: 6 steps are one epoch, so every file, truncated.jpg included, is drawn once."""
    train = _train_script()
    assert train.main(_args(tiny_sdxl_dir, corpus, tmp_path / "run", "train.max_train_steps=6")) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = [i for i, line in enumerate(printed) if line.startswith("data: 12 images ok, 6 skipped")]
    assert summary and "(line 3, 5)" in printed[summary[0]], printed
    # The truncated JPEG passed the header scan and failed in __getitem__: counted, reported after training.
    after = [line for line in printed[summary[0] + 1:] if "decode errors while loading" in line]
    assert after and "1 decode errors" in after[0], printed
    assert (tmp_path / "run/final/pytorch_lora_weights.safetensors").is_file()
