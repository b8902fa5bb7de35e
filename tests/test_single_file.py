"""Single-file checkpoints (`model.safetensors`, A1111/ComfyUI layout) through every entry point, offline.

The shipped mini teacher is written as one SGM/LDM-named file (tests/_single_file.py), with its configs in a folder
without weights; loading it must give the folder-loaded teacher back bit for bit, and training, caching, sampling and
evaluation from it must give what they give from the folder.
"""

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lcm.cache import CacheError, CachedDataset, build_cache, check_cache_matches, read_manifest
from lcm.cli import MINI_TEACHER, main as lcm_main
from lcm.config import load_config
from lcm.evaluate import evaluate
from lcm.export import export_run
from lcm.models import SingleFileError, is_single_file, load_pipeline
from lcm.serve import teacher_scheduler_of
from lcm.tiny import make_captioned_image_folder

from _helpers import load_entry_script, sdxl_unet_inputs
from _single_file import config_only_copy, save_single_file

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """(checkpoint file, its weight-free config folder, a small captioned image folder)."""
    tmp = tmp_path_factory.mktemp("single")
    (tmp / "ckpt").mkdir()
    save_single_file(load_pipeline("sdxl", str(MINI_TEACHER)), tmp / "ckpt" / "model.safetensors")
    configs = config_only_copy(MINI_TEACHER, tmp / "configs")
    data = make_captioned_image_folder(tmp / "data", n=4, size=16)
    return tmp / "ckpt" / "model.safetensors", configs, data


def _assert_same_pipeline(a, b):
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab() and a.tokenizer_2.get_vocab() == b.tokenizer_2.get_vocab()
    assert dict(a.scheduler.config) == dict(b.scheduler.config)
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor


def test_file_uses_sdxl_checkpoint_names(single):
    keys = set(load_file(str(single[0])))
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
                "model.diffusion_model.output_blocks.2.2.conv.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection"):
        assert key in keys, key
    assert not any(k.startswith(("unet.", "vae.", "down_blocks")) for k in keys)


def test_single_file_loads_the_teacher_bit_for_bit_from_config_dir_or_reference(single, no_network):
    ckpt, configs, _ = single
    folder = load_pipeline("sdxl", str(MINI_TEACHER))
    _assert_same_pipeline(load_pipeline("sdxl", str(ckpt), config_dir=str(configs)), folder)
    # No config_dir and no model_index.json beside the file: the shipped mini-teacher configs match its shapes.
    from_reference = load_pipeline("sdxl", str(ckpt))
    _assert_same_pipeline(from_reference, folder)
    inputs = sdxl_unet_inputs(folder.unet)
    with torch.no_grad():
        assert torch.equal(from_reference.unet(**inputs).sample, folder.unet(**inputs).sample)


def test_missing_configs_or_tensors_are_clear_errors(single, tiny_sdxl_dir, tmp_path):
    ckpt, configs, _ = single
    # Another architecture (the tiny SDXL), no configs anywhere: the error names model.config_dir, no hub call.
    save_single_file(load_pipeline("sdxl", str(tiny_sdxl_dir)), tmp_path / "tiny.safetensors")
    with pytest.raises(SingleFileError, match="model.config_dir"):
        load_pipeline("sdxl", str(tmp_path / "tiny.safetensors"))
    with pytest.raises(SingleFileError, match="model.config_dir"):
        load_pipeline("sdxl", str(ckpt), config_dir=str(tmp_path))  # a folder without model_index.json
    with pytest.raises(FileNotFoundError, match="does not exist"):
        is_single_file(str(tmp_path / "typo.safetensors"))
    # A file lacking one UNet tensor: diffusers leaves it on the meta device and fails in torch; we say why.
    state = load_file(str(ckpt))
    del state["model.diffusion_model.out.2.bias"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(SingleFileError, match="not in the file"):
        load_pipeline("sdxl", str(tmp_path / "partial.safetensors"), config_dir=str(configs))


def _train(script, teacher, configs, data, out, *extra):
    config = "mini_lcm_lora" if script == "train_lcm_lora" else "mini_lcd"
    args = ["--config", config, f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={out}",
            "train.batch_size=2", "train.max_train_steps=2", "train.report_to=none", "train.checkpoint_every=0",
            "validation.every_n_steps=0", "optim.lr_warmup_steps=0", *extra]
    if configs:
        args.append(f"model.config_dir={configs}")
    assert load_entry_script(script).main(args) == 0
    return out


@pytest.fixture(scope="module")
def lora_runs(single, tmp_path_factory):
    """The same LoRA run from the folder and from the file (2 steps): {"folder": run, "file": run}."""
    ckpt, configs, data = single
    tmp = tmp_path_factory.mktemp("runs")
    return {"folder": _train("train_lcm_lora", MINI_TEACHER, None, data, tmp / "folder", "lora.rank=4"),
            "file": _train("train_lcm_lora", ckpt, configs, data, tmp / "file", "lora.rank=4")}


def test_lora_trained_from_the_file_equals_the_folder_run_and_exports(lora_runs):
    a, b = (load_file(str(lora_runs[k] / "final" / "pytorch_lora_weights.safetensors")) for k in ("folder", "file"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in b.items() if "lora_B" in k)  # it trained
    card = (lora_runs["file"] / "final" / "README.md").read_text()
    assert "from_single_file" in card and "model.safetensors" in card
    fused = [export_run(lora_runs[k], "fused", lora_runs[k] / "fused") for k in ("folder", "file")]
    fa, fb = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in fused)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_full_lcd_trained_from_the_file_equals_the_folder_run(single, tmp_path):
    ckpt, configs, data = single
    runs = [_train("train_lcd", MINI_TEACHER, None, data, tmp_path / "folder", "distill.w_embed_dim=16"),
            _train("train_lcd", ckpt, configs, data, tmp_path / "file", "distill.w_embed_dim=16")]
    a, b = (load_file(str(r / "final" / "unet" / "diffusion_pytorch_model.safetensors")) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lcm_sample_and_serve_scheduler_from_the_file_equal_the_folder(single, lora_runs, tmp_path):
    ckpt, configs, _ = single
    grids = {}
    for name, base in (("folder", [str(MINI_TEACHER)]), ("file", [str(ckpt), "--config-dir", str(configs)])):
        grids[name] = tmp_path / f"{name}.png"
        assert lcm_main(["sample", "--base", *base, "--lora", str(lora_runs["file"]), "--prompt", "seven",
                         "--prompt", "the number 3, handwritten", "--seeds", "0-2", "--steps", "2",
                         "--out", str(grids[name])]) == 0
    assert list(Image.open(grids["folder"]).getdata()) == list(Image.open(grids["file"]).getdata())
    assert dict(teacher_scheduler_of(str(ckpt), str(configs)).config) == dict(teacher_scheduler_of(
        str(MINI_TEACHER)).config)


def test_lcm_eval_from_the_file_equals_the_folder(single, lora_runs, tmp_path):
    ckpt, configs, _ = single
    common = dict(lora=str(lora_runs["file"]), n=10, steps=(2,), teacher_extra_steps=(), teacher_w=0.5,
                  methods=["DDIM", "LCM-LoRA"])
    a = evaluate(str(MINI_TEACHER), out_dir=tmp_path / "folder", **common)
    b = evaluate(str(ckpt), out_dir=tmp_path / "file", config_dir=str(configs), **common)
    assert [(r.method, r.steps, r.accuracy, r.frechet) for r in a] == [(r.method, r.steps, r.accuracy, r.frechet)
                                                                      for r in b]


def test_lcm_cache_from_the_file_holds_the_folder_encodings_and_tracks_the_file(single, tmp_path):
    ckpt, configs, data = single
    overrides = [f"data.path={data}", "data.resolution=16"]
    cfg_folder = load_config("mini_lcm_lora", [*overrides, f"data.cache_dir={tmp_path / 'a'}"])
    cfg_file = load_config("mini_lcm_lora", [*overrides, f"data.cache_dir={tmp_path / 'b'}",
                                             f"model.pretrained={ckpt}", f"model.config_dir={configs}"])
    build_cache(cfg_folder, batch_size=4)
    build_cache(cfg_file, batch_size=4)
    folder_items, file_items = CachedDataset(cfg_folder), CachedDataset(cfg_file)
    assert len(folder_items) == len(file_items) == 4
    for i in range(4):  # VAE moments and both text encoders' conditioning, item by item
        a, b = folder_items[i], file_items[i]
        assert torch.equal(a["latent_mean"], b["latent_mean"]) and torch.equal(a["latent_std"], b["latent_std"])
        for part in ("cond", "uncond"):
            assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    # The file cache is keyed by the file's contents, not its path: the same bytes elsewhere match, other bytes not.
    check_cache_matches(read_manifest(tmp_path / "b"), cfg_file, tmp_path / "b")
    state = load_file(str(ckpt))
    copy, changed = tmp_path / "copy" / "model.safetensors", tmp_path / "changed" / "model.safetensors"
    for path in (copy, changed):
        path.parent.mkdir()
    shutil.copy(ckpt, copy)
    state["first_stage_model.encoder.conv_in.bias"] = state["first_stage_model.encoder.conv_in.bias"] + 1
    save_file(state, str(changed))
    for path, matches in ((copy, True), (changed, False)):
        cfg = load_config("mini_lcm_lora", [*overrides, f"data.cache_dir={tmp_path / 'b'}",
                                            f"model.pretrained={path}", f"model.config_dir={configs}"])
        if matches:
            check_cache_matches(read_manifest(tmp_path / "b"), cfg, tmp_path / "b")
        else:
            with pytest.raises(CacheError, match="another"):
                check_cache_matches(read_manifest(tmp_path / "b"), cfg, tmp_path / "b")
