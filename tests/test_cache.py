"""The latent cache: cached batches equal uncached ones, invalidation is exact, damage is an error, and training from
a cache loads neither the VAE nor the text encoders."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lcm.cache import CacheError, CachedDataset, build_cache, read_manifest
from lcm.config import load_config
from lcm.consistency import LCDSpec, lcd_loss
from lcm.data import build_dataset, collate_fn
from lcm.encode import lcd_batch_from_data
from lcm.models import load_pipeline, noise_schedule_of
from lcm.roles import denoiser_role
from lcm.schedule import SolverGrid
from lcm.tiny import save_tiny_pipeline

from _helpers import MIXED_SIZES as SIZES, load_entry_script, mixed_size_image_folder


def _cfg(teacher, data, cache, *extra):
    return load_config("demo_lcm_lora", [f"model.pretrained={teacher}", f"data.path={data}", f"data.cache_dir={cache}",
                                         "data.resolution=16", *extra])


@pytest.fixture(scope="module")
def setup(tiny_sdxl_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    data = mixed_size_image_folder(tmp / "data")
    cfg = _cfg(tiny_sdxl_dir, data, tmp / "cache", "data.random_flip=true")
    report = build_cache(cfg, batch_size=4)
    return cfg, report


def _batches(cfg, indices, epoch):
    """The same items through the uncached loader and through the cache."""
    plain, cached = build_dataset(cfg.data, seed=cfg.train.seed), CachedDataset(cfg, seed=cfg.train.seed)
    plain.set_epoch(epoch)
    cached.set_epoch(epoch)
    return collate_fn([plain[i] for i in indices]), collate_fn([cached[i] for i in indices]), plain


def test_first_build_encodes_every_variant(setup):
    cfg, report = setup
    assert report.items == len(SIZES) and report.reused == 0 and report.damaged == 0
    assert report.latents_encoded == 2 * len(SIZES)  # both flips of every image
    manifest = read_manifest(cfg.data.cache_dir)
    assert [len(v) for v in manifest["items"]] == [2] * len(SIZES)


def test_cached_batch_gives_the_uncached_loss(setup, tiny_sdxl_dir):
    cfg, _ = setup
    pipe = load_pipeline("sdxl", str(tiny_sdxl_dir))
    sc = pipe.scheduler.config
    spec = LCDSpec(noise_schedule_of(pipe.scheduler), SolverGrid(sc.num_train_timesteps, 50), sc.prediction_type,
                   "ddim", "huber", 0.001, 0.5, 10.0)
    role = denoiser_role(pipe.unet)
    indices = list(range(len(SIZES)))
    for epoch in (0, 1):
        plain_batch, cached_batch, plain = _batches(cfg, indices, epoch)
        flips = [plain.draw_transform(plain.sizes[i], i)[3] for i in indices]
        assert any(flips) and not all(flips), "the check must cover flipped and unflipped items"
        for key in ("original_size", "crop_top_left", "target_size"):
            assert torch.equal(plain_batch[key], cached_batch[key]), key
        lcds = [lcd_batch_from_data(pipe, batch, [torch.Generator().manual_seed(7 + i) for i in indices], cfg.distill,
                                    spec.grid, "cpu") for batch in (plain_batch, cached_batch)]
        torch.testing.assert_close(lcds[1].z0, lcds[0].z0, atol=1e-5, rtol=1e-5)
        for part in ("cond", "uncond"):
            a, b = getattr(lcds[0], part), getattr(lcds[1], part)
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(b[k].float(), a[k].float(), atol=1e-5, rtol=1e-5)
        assert torch.equal(lcds[0].index, lcds[1].index) and torch.equal(lcds[0].w, lcds[1].w)
        losses = [lcd_loss(role, role, role, lcd, spec)[0] for lcd in lcds]
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-4)


def _record_bytes(cfg, index):
    ds = CachedDataset(cfg)
    item = ds[index]
    return item["latent_mean"].clone(), item["cond"]["encoder_hidden_states"].clone()


def test_changed_image_re_encodes_only_that_item(tiny_sdxl_dir, tmp_path):
    data = mixed_size_image_folder(tmp_path / "data")
    cfg = _cfg(tiny_sdxl_dir, data, tmp_path / "cache")
    build_cache(cfg, batch_size=4)
    before = [_record_bytes(cfg, i) for i in range(len(SIZES))]
    image = Image.open(data / "0002.png")
    Image.new("RGB", image.size, (1, 2, 3)).save(data / "0002.png")  # same size and caption: only the latent changes
    report = build_cache(cfg, batch_size=4)
    assert (report.latents_encoded, report.texts_encoded) == (1, 0)
    after = [_record_bytes(cfg, i) for i in range(len(SIZES))]
    for i in range(len(SIZES)):
        assert torch.equal(before[i][1], after[i][1])
        assert torch.equal(before[i][0], after[i][0]) == (i != 2), i
    # A changed caption re-encodes only that item's text record.
    (data / "0004.txt").write_text("a red circle")
    report = build_cache(cfg, batch_size=4)
    assert (report.latents_encoded, report.texts_encoded) == (0, 1)


def test_crop_size_or_model_change_invalidates(tiny_sdxl_dir, tmp_path):
    data = mixed_size_image_folder(tmp_path / "data")
    cfg = _cfg(tiny_sdxl_dir, data, tmp_path / "cache")
    build_cache(cfg, batch_size=4)
    # Training with another resolution against this cache is refused, naming the key.
    with pytest.raises(CacheError, match="data.resolution"):
        CachedDataset(_cfg(tiny_sdxl_dir, data, tmp_path / "cache", "data.resolution=12"))
    report = build_cache(_cfg(tiny_sdxl_dir, data, tmp_path / "cache", "data.resolution=12"), batch_size=4)
    # Every latent and text record changes (the text's micro-conditioning holds the target size); only the shared
    # empty-caption record of the unchanged text encoders is reused.
    assert (report.latents_encoded, report.texts_encoded, report.reused) == (len(SIZES), len(SIZES), 1)
    # Another teacher (other VAE and text encoder weights) with the same config keys.
    other = save_tiny_pipeline("sdxl", tmp_path / "other", seed=1)
    cfg12 = _cfg(other, data, tmp_path / "cache", "data.resolution=12")
    with pytest.raises(CacheError, match="another VAE"):
        CachedDataset(cfg12)
    report = build_cache(cfg12, batch_size=4)
    assert (report.latents_encoded, report.texts_encoded, report.reused) == (len(SIZES), len(SIZES), 0)
    assert report.shards_removed >= 1  # nothing of the old model's cache is live any more
    assert len(CachedDataset(cfg12)) == len(SIZES)


def _shard(cfg):
    manifest = read_manifest(cfg.data.cache_dir)
    return cfg.data.cache_dir + "/" + next(iter(manifest["records"].values()))["shard"], manifest


def test_damaged_shard_is_a_clear_error_and_lcm_cache_repairs_it(tiny_sdxl_dir, tmp_path):
    data = mixed_size_image_folder(tmp_path / "data")
    cfg = _cfg(tiny_sdxl_dir, data, tmp_path / "cache")
    build_cache(cfg, batch_size=8)
    path, manifest = _shard(cfg)
    raw = bytearray(open(path, "rb").read())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header + (len(raw) - header) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    open(path, "wb").write(bytes(raw))
    ds = CachedDataset(cfg)
    with pytest.raises(CacheError, match="checksum"):
        for i in range(len(ds)):
            ds[i]
    report = build_cache(cfg, batch_size=8)
    assert report.damaged >= 1 and report.latents_encoded + report.texts_encoded >= 1
    ds = CachedDataset(cfg)
    for i in range(len(ds)):
        ds[i]
    # A truncated shard: the error names the file.
    path, _ = _shard(cfg)
    open(path, "r+b").truncate(100)
    with pytest.raises(CacheError, match="cannot be read"):
        for i in range(len(CachedDataset(cfg))):
            CachedDataset(cfg)[i]
    manifest_path = tmp_path / "cache" / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "format": 0}))
    with pytest.raises(CacheError, match="format"):
        CachedDataset(cfg)


def test_random_crop_cannot_be_cached(tiny_sdxl_dir, tmp_path):
    with pytest.raises(CacheError, match="center_crop"):
        build_cache(_cfg(tiny_sdxl_dir, mixed_size_image_folder(tmp_path / "data"), tmp_path / "cache", "data.center_crop=false"))


def test_training_from_cache_loads_no_vae_or_text_encoder(tiny_sdxl_dir, tmp_path, monkeypatch):
    data = mixed_size_image_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    extra = ["data.buckets=true", "data.bucket_step=4", "data.random_flip=true"]
    build_cache(_cfg(tiny_sdxl_dir, data, cache, *extra), batch_size=4)

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__} was loaded while training from a cache")

    for cls in (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))
    out = tmp_path / "run"
    args = ["--config", "demo_lcm_lora", f"model.pretrained={tiny_sdxl_dir}", f"data.path={data}",
            f"data.cache_dir={cache}", "data.resolution=16", *extra, "train.batch_size=1", "train.report_to=none",
            "lora.rank=4", "lora.alpha=4", "validation.every_n_steps=0", "train.max_train_steps=2",
            f"train.output_dir={out}"]
    assert load_entry_script("train_lcm_lora").main(args) == 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_undecodable_image_is_left_out_and_its_shared_text_record_still_written(tiny_sdxl_dir, tmp_path):
    """A JPEG whose header is fine but whose data is cut passes the index and fails to decode. It is listed before
    image 0000 and has its caption and size, so it is planned to write the text records 0000 also reads."""
    import io

    data = mixed_size_image_folder(tmp_path / "data")
    buffer = io.BytesIO()
    Image.open(data / "0000.png").save(buffer, "JPEG")
    (data / "00.jpg").write_bytes(buffer.getvalue()[:-10])
    (data / "00.txt").write_text((data / "0000.txt").read_text())
    cfg = _cfg(tiny_sdxl_dir, data, tmp_path / "cache", "data.random_flip=true")
    assert build_dataset(cfg.data).images[0].name == "00.jpg"
    report = build_cache(cfg, batch_size=4)
    manifest = read_manifest(cfg.data.cache_dir)
    assert report.items == len(SIZES) and manifest["summary"]["n_decode_errors"] == 1  # one image, both flips
    # Every live text record encoded once, 0000's by the failed entries of 00.jpg (a square: both flips share one).
    assert report.texts_encoded == len({v["text"] for variants in manifest["items"] for v in variants})
    ds = CachedDataset(cfg)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert [ds[i]["caption"] for i in range(len(ds))] == [v[0]["caption"] for v in manifest["items"]]
