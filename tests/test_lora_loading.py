"""Loading a LoRA is all or nothing: every path that loads one (`lcm sample`, `lcm serve`, `lcm eval`, training resume,
`lcm export`) refuses a file whose tensors do not all land on a module; kohya-format SDXL LoRAs written by other tools
load through `lcm sample`, alone and stacked with ours; `lcm eval` compares several LoRA students in one table."""

import json
import logging
import re
import warnings

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lcm import serve as serve_module
from lcm.cli import MINI_TEACHER, main as lcm_main
from lcm.config import LCM_LORA_TARGETS
from lcm.evaluate import default_student_name, evaluate, lora_students
from lcm.lora import LoRALoadError, add_lora, load_lora_into_training_unet, lora_state_dict, save_lora
from lcm.sampling import load_pipeline_for_sampling
from lcm.tiny import make_captioned_image_folder

from _helpers import load_entry_script, randomise_lora_b, write_lora_run

LORA_FILE = "pytorch_lora_weights.safetensors"
ATTENTION = (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")


def _legacy_attention_names(state: dict) -> dict:
    """What diffusers' `convert_state_dict_to_diffusers` (used by its reference LCM script) does to a PEFT LoRA: the
    attention projections get the legacy `.lora.down/.lora.up` names; every other key keeps its PEFT name."""
    out = {}
    for key, tensor in state.items():
        if any(a in key for a in ATTENTION):
            key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        out[key] = tensor
    return out


def _rewrite(path, transform) -> int:
    """Rewrite a safetensors file through `transform(state) -> state`, keeping its header; returns how many keys changed."""
    with safe_open(str(path), "pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    new = transform(state)
    save_file(new, str(path), metadata=meta)
    return len(set(new) - set(state))


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl_dir, tmp_path_factory):
    """A finished run folder (config.yaml + final/) for the tiny SDXL teacher, written by the real export_lora_run."""
    return write_lora_run(tiny_sdxl_dir, tmp_path_factory.mktemp("loading") / "run", 4, 8)


@pytest.fixture(scope="module")
def half_run(lora_run, tmp_path_factory):
    """The same run with its attention keys in the legacy names `load_lora_weights` skips; (run, renamed count)."""
    import shutil

    run = tmp_path_factory.mktemp("loading") / "half"
    shutil.copytree(lora_run, run)
    n = _rewrite(run / "final" / LORA_FILE, _legacy_attention_names)
    assert n > 0
    return run, n


def _expected_message(path, n_lost: int) -> str:
    n_total = len(load_file(str(path)))
    return rf"LoRA {re.escape(str(path))} did not fully load: {n_lost} of its {n_total} tensors landed on no module .*\.lora\.down\.weight"


# ------------------------------------------------------------------------------------------------- the silent half-load
def test_diffusers_alone_only_warns_about_the_half_load(tiny_sdxl_dir, half_run, caplog):
    """Why the check exists: `load_lora_weights` accepts the file, drops the attention tensors, and only warns."""
    run, _ = half_run
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(run / "final"), adapter_name="x")
    messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert any("inconsistency" in m or "unexpected keys" in m for m in messages), messages


def test_lcm_sample_refuses_a_half_loading_lora_and_loads_a_complete_one(tiny_sdxl_dir, lora_run, half_run,
                                                                         tmp_path):
    run, n = half_run
    args = ["sample", "--base", str(tiny_sdxl_dir), "--prompt", "a red circle", "--seeds", "0", "--steps", "1",
            "--height", "16", "--width", "16"]
    with pytest.raises(LoRALoadError, match=_expected_message(run / "final" / LORA_FILE, n)):
        lcm_main([*args, "--lora", str(run), "--out", str(tmp_path / "bad.png")])
    assert not (tmp_path / "bad.png").exists()
    assert lcm_main([*args, "--lora", str(lora_run), "--out", str(tmp_path / "good.png")]) == 0
    assert (tmp_path / "good.png").is_file()


def test_lcm_serve_refuses_a_half_loading_lora_before_serving(tiny_sdxl_dir, half_run, monkeypatch):
    def page_built(*args, **kwargs):
        raise AssertionError("the page was built: the half-loaded LoRA was accepted")

    monkeypatch.setattr(serve_module, "build_page", page_built)
    run, n = half_run
    with pytest.raises(LoRALoadError, match=_expected_message(run / "final" / LORA_FILE, n)):
        lcm_main(["serve", "--base", str(tiny_sdxl_dir), "--lora", str(run), "--steps", "1", "--height", "16",
                  "--width", "16"])


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "fused"])
def test_lcm_export_refuses_a_half_loading_run(half_run, lora_run, fmt, tmp_path):
    run, n = half_run
    with pytest.raises(LoRALoadError, match=_expected_message(run / "final" / LORA_FILE, n)):
        lcm_main(["export", str(run), "--format", fmt, "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    assert lcm_main(["export", str(lora_run), "--format", fmt, "--out", str(tmp_path / "good")]) == 0


def test_resume_refuses_a_checkpoint_that_does_not_fully_load(tiny_sdxl_dir, tmp_path):
    """The real resume path: a run checkpoints, its adapter file is damaged, `--resume latest` stops."""
    train = load_entry_script("train_lcm_lora")
    data = make_captioned_image_folder(tmp_path / "data", n=2, size=16)
    out = tmp_path / "run"

    def args(steps):
        return ["--config", "demo_lcm_lora", f"model.pretrained={tiny_sdxl_dir}", f"data.path={data}",
                f"train.output_dir={out}", "data.resolution=16", "train.batch_size=2", "train.report_to=none",
                "lora.rank=4", "lora.alpha=4", "validation.every_n_steps=0", f"train.max_train_steps={steps}",
                "train.checkpoint_every=1", "optim.lr_warmup_steps=0"]  # step 1 must move the adapters

    assert train.main(args(1)) == 0
    adapter = out / "checkpoints/step-000001/lora_adapter.safetensors"
    n = _rewrite(adapter, _legacy_attention_names)
    with pytest.raises(LoRALoadError, match=rf"{re.escape(str(adapter))} did not fully load: {n} of its"):
        train.main([*args(2), "--resume", "latest"])


def test_resume_loader_accepts_a_complete_state_and_refuses_renamed_keys(tiny_sdxl_dir):
    source = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    add_lora(source, 4, 4, LCM_LORA_TARGETS)
    randomise_lora_b(source, seed=2)
    state = lora_state_dict(source)
    target = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    add_lora(target, 4, 4, LCM_LORA_TARGETS)
    load_lora_into_training_unet(target, state)
    assert all(torch.equal(lora_state_dict(target)[k], v) for k, v in state.items())
    fresh = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    add_lora(fresh, 4, 4, LCM_LORA_TARGETS)
    with pytest.raises(LoRALoadError, match="ckpt.safetensors did not fully load"):
        load_lora_into_training_unet(fresh, _legacy_attention_names(state), source="ckpt.safetensors")


def test_pixart_peft_lora_that_does_not_fully_load_is_refused(tmp_path):
    """PixArt's branch of `lcm sample` (PEFT folder format, merged into the transformer) is checked before merging."""
    from diffusers import PixArtAlphaPipeline

    from lcm.lora import PEFT_WEIGHTS_FILE
    from lcm.tiny import save_tiny_pipeline

    base = save_tiny_pipeline("pixart", tmp_path / "pixart", seed=0)
    pipe = PixArtAlphaPipeline.from_pretrained(base)
    add_lora(pipe.transformer, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    randomise_lora_b(pipe.transformer, seed=3)
    save_lora(pipe.transformer, tmp_path / "lora", PixArtAlphaPipeline)
    args = ["sample", "--base", str(base), "--prompt", "a red circle", "--seeds", "0", "--steps", "1", "--height",
            "16", "--width", "16", "--dtype", "fp32"]
    assert lcm_main([*args, "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "good.png")]) == 0
    n = _rewrite(tmp_path / "lora" / PEFT_WEIGHTS_FILE, _legacy_attention_names)
    with pytest.raises(LoRALoadError, match=_expected_message(tmp_path / "lora" / PEFT_WEIGHTS_FILE, n)):
        lcm_main([*args, "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "bad.png")])


# ------------------------------------------------------------------------------------------ third-party kohya SDXL files
# Written here by hand, not by lcm's exporter: kohya's SGM names for modules of the tiny SDXL UNet (2 blocks, 2 layers
# per block). SGM counts input blocks flat from conv_in (0): down block 0 → 1, 2 (+ its downsampler `op`, 3); down
# block 1 → 4, 5; ResBlock layers: in_layers.2 = conv1, emb_layers.1 = time_emb_proj, out_layers.3 = conv2,
# skip_connection = conv_shortcut; up block 0 → output blocks 0–2 (the upsampler in block 2 after its transformer),
# up block 1 → 3–5.
KOHYA_MODULES = {
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_2_0_in_layers_2": "down_blocks.0.resnets.1.conv1",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_5_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k",
    "middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_0_1_transformer_blocks_1_attn1_to_out_0":
        "up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_out.0",
    "output_blocks_2_1_proj_out": "up_blocks.0.attentions.2.proj_out",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_0_skip_connection": "up_blocks.1.resnets.2.conv_shortcut",
}
KOHYA_RANK, KOHYA_ALPHA = 2, 1.0  # alpha ≠ rank: a lost alpha would change the scale


def _kohya_lora(unet, seed: int = 0) -> dict:
    """kohya keys (`lora_unet_<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`) with seeded tensors."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, path in KOHYA_MODULES.items():
        m = unet.get_submodule(path)
        if isinstance(m, torch.nn.Conv2d):
            down, up = (KOHYA_RANK, m.in_channels, *m.kernel_size), (m.out_channels, KOHYA_RANK, 1, 1)
        else:
            down, up = (KOHYA_RANK, m.in_features), (m.out_features, KOHYA_RANK)
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(down, generator=g)
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(up, generator=g)
        state[f"lora_unet_{name}.alpha"] = torch.tensor(KOHYA_ALPHA)
    return state


@pytest.fixture(scope="module")
def kohya_file(tiny_sdxl_dir, tmp_path_factory):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    path = tmp_path_factory.mktemp("kohya") / "third_party_lora.safetensors"
    save_file(_kohya_lora(unet), str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def _assert_kohya_landed(pipe, path, adapter: str, weight: float = 1.0) -> None:
    """Every hand-written tensor sits on the diffusers module it names, scaled by weight · alpha / rank."""
    state = load_file(str(path))
    for name, module_path in KOHYA_MODULES.items():
        m = pipe.unet.get_submodule(module_path)
        assert torch.equal(m.lora_A[adapter].weight, state[f"lora_unet_{name}.lora_down.weight"]), module_path
        assert torch.equal(m.lora_B[adapter].weight, state[f"lora_unet_{name}.lora_up.weight"]), module_path
        assert m.scaling[adapter] == pytest.approx(weight * KOHYA_ALPHA / KOHYA_RANK)


def test_lcm_sample_loads_a_third_party_kohya_sdxl_lora(tiny_sdxl_dir, kohya_file, tmp_path):
    pipe = load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(kohya_file), 1.0)], device="cpu")
    _assert_kohya_landed(pipe, kohya_file, "lora0")
    assert lcm_main(["sample", "--base", str(tiny_sdxl_dir), "--lora", str(kohya_file), "--prompt", "a red circle",
                     "--seeds", "0", "--steps", "1", "--height", "16", "--width", "16",
                     "--out", str(tmp_path / "k.png")]) == 0


def test_kohya_lora_stacks_with_ours(tiny_sdxl_dir, kohya_file, lora_run):
    pipe = load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(lora_run), 1.0), (str(kohya_file), 0.7)],
                                      device="cpu")
    _assert_kohya_landed(pipe, kohya_file, "lora1", weight=0.7)
    ours = load_file(str(lora_run / "final" / LORA_FILE))
    key = next(k for k in ours if ".to_q.lora_A." in k)
    module = pipe.unet.get_submodule(key.removeprefix("unet.").removesuffix(".lora_A.weight"))
    assert torch.equal(module.lora_A["lora0"].weight, ours[key])
    assert set(pipe.get_active_adapters()) == {"lora0", "lora1"}


def test_lcm_sample_loads_our_own_kohya_export(tiny_sdxl_dir, lora_run, tmp_path):
    assert lcm_main(["export", str(lora_run), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    assert lcm_main(["sample", "--base", str(tiny_sdxl_dir), "--lora",
                     str(tmp_path / "k" / "lcm_lora_kohya.safetensors"), "--prompt", "a red circle", "--seeds", "0",
                     "--steps", "1", "--height", "16", "--width", "16", "--out", str(tmp_path / "s.png")]) == 0


def test_incomplete_kohya_files_are_refused(tiny_sdxl_dir, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    state = _kohya_lora(unet)
    # A module this UNet does not have (its block 4 transformer has one layer, not four): a LoRA for another base.
    extra = "lora_unet_input_blocks_4_1_transformer_blocks_3_attn1_to_q"
    save_file({**state, f"{extra}.lora_down.weight": torch.randn(KOHYA_RANK, 64),
               f"{extra}.lora_up.weight": torch.randn(64, KOHYA_RANK), f"{extra}.alpha": torch.tensor(1.0)},
              str(tmp_path / "other_base.safetensors"))
    with pytest.raises(ValueError, match=r"does not have, first: 'down_blocks\.1\.attentions\.0\.transformer_blocks\.3"):
        load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(tmp_path / "other_base.safetensors"), 1.0)])
    # Attention projections are checked too (diffusers reads kohya's as `processor.to_k_lora`): a wrong width is named.
    to_k = "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k.lora_down.weight"
    save_file({**state, to_k: torch.randn(KOHYA_RANK, state[to_k].shape[1] + 8)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"first mismatch at module "
                                         r"'down_blocks\.1\.attentions\.1\.transformer_blocks\.1\.attn2\.to_k'"):
        load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(tmp_path / "wide.safetensors"), 1.0)])
    # DoRA magnitudes: diffusers drops `dora_scale` tensors with a warning and loads the rest.
    name = next(iter(KOHYA_MODULES))
    dora = {**state, f"lora_unet_{name}.dora_scale": torch.ones(1, unet.get_submodule(KOHYA_MODULES[name]).in_features)}
    save_file(dora, str(tmp_path / "dora.safetensors"))
    with pytest.raises(LoRALoadError, match=rf"did not fully load: 1 of its {2 * len(KOHYA_MODULES) + 1} tensors "
                                            rf".*'lora_unet_{name}\.dora_scale'"):
        load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(tmp_path / "dora.safetensors"), 1.0)])


# ---------------------------------------------------------------------------------------- several students in lcm eval
def test_student_row_names():
    assert default_student_name("runs/a") == "a" and default_student_name("runs/a/final") == "a"
    assert default_student_name("runs/a/export/kohya/lcm_lora_kohya.safetensors") == "kohya"
    assert lora_students("runs/a") == {"LCM-LoRA": "runs/a"}  # one unnamed student keeps the old row name
    assert lora_students(["runs/a", ("fast", "runs/b")]) == {"a": "runs/a", "fast": "runs/b"}
    assert lora_students({"x": "runs/a"}) == {"x": "runs/a"}
    for clash in (["runs/a", "other/a"], [("DDIM", "runs/a")]):
        with pytest.raises(ValueError, match="NAME=PATH"):
            lora_students(clash)


def _mini_lora(out_dir, seed: int):
    pipe = StableDiffusionXLPipeline.from_pretrained(MINI_TEACHER)
    add_lora(pipe.unet, 4, 4, LCM_LORA_TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_lora(pipe.unet, out_dir, StableDiffusionXLPipeline)
    return out_dir


def test_lcm_eval_compares_several_students_in_one_table(tmp_path):
    a, b = _mini_lora(tmp_path / "runA", 1), _mini_lora(tmp_path / "runB", 2)
    common = ["--n", "10", "--steps", "1", "--teacher-w", "0.5"]
    assert lcm_main(["eval", "--lora", f"fast={a}", "--lora", str(b), "--out", str(tmp_path / "both"),
                     "--methods", "DDIM,LCM-LoRA", *common]) == 0
    rows = json.loads((tmp_path / "both" / "results.json").read_text())["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [("DDIM", 1), ("DDIM", 25), ("fast", 1), ("runB", 1)]
    table = (tmp_path / "both" / "table.md").read_text()
    assert table.count("| fast |") == 1 and table.count("| runB |") == 1
    # Each student's row is that student alone: the same numbers as a run with only it (the Python API, a dict).
    for name, path in (("fast", a), ("runB", b)):
        alone = evaluate(str(MINI_TEACHER), {name: str(path)}, tmp_path / name, n=10, steps=[1], teacher_w=0.5,
                         methods=[name])
        (row,) = [r for r in rows if r["method"] == name]
        assert (alone[0].accuracy, alone[0].frechet) == (row["accuracy"], row["frechet"])
    assert [r["frechet"] for r in rows if r["method"] == "fast"] != [r["frechet"] for r in rows if r["method"] == "runB"]


def test_lcm_eval_refuses_a_half_loading_student(tmp_path):
    a = _mini_lora(tmp_path / "good", 1)
    bad = _mini_lora(tmp_path / "bad", 2)
    n = _rewrite(bad / LORA_FILE, _legacy_attention_names)
    with pytest.raises(LoRALoadError, match=_expected_message(bad / LORA_FILE, n)):
        lcm_main(["eval", "--lora", str(a), "--lora", str(bad), "--out", str(tmp_path / "e"), "--n", "2",
                  "--steps", "1", "--methods", "LCM-LoRA"])
