"""`lcm export` (diffusers copy, kohya keys, fused UNet) and LoRA stacking, on a tiny SDXL run made in-process."""

import logging
import warnings

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from lcm import cli
from lcm.cli import main as lcm_main
from lcm.config import LCM_LORA_TARGETS
from lcm.export import (EXPORT_FORMATS, KOHYA_FILE, check_kohya_round_trip, kohya_name,
                        peft_to_kohya)
from lcm.lora import add_lora
from lcm.sampling import load_pipeline_for_sampling

from _helpers import randomise_lora_b, sdxl_unet_inputs, write_lora_run

RANK, ALPHA = 4, 8  # alpha ≠ rank, so a lost or misread alpha changes the output by a factor of 2


_unet_inputs = sdxl_unet_inputs


@torch.no_grad()
def _out(unet):
    return unet(**_unet_inputs(unet)).sample


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl_dir, tmp_path_factory):
    """A run folder as train_lcm_lora.py leaves it (config.yaml + final/), written by the real export_lora_run."""
    return write_lora_run(tiny_sdxl_dir, tmp_path_factory.mktemp("export") / "run", RANK, ALPHA)


@pytest.fixture(scope="module")
def style_lora(tiny_sdxl_dir, tmp_path_factory):
    """Another LoRA to stack: random non-zero PEFT adapters on the attention projections, saved by diffusers."""
    out = tmp_path_factory.mktemp("style")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    unet.add_adapter(PeftLoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    randomise_lora_b(unet, seed=2)
    StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return out


# ------------------------------------------------------------------------------------------------------- kohya naming
# The published SDXL UNet layout (block structure only; the channels do not matter for names).
SDXL_LAYOUT = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True)
# Another layout: four blocks, one layer each, attention everywhere but the top level.
OTHER_LAYOUT = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=32)


def _fake_peft_state(layout):
    """A PEFT LoRA state dict covering every LCM-LoRA target of a UNet built on the meta device (no memory)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**layout)
    paths = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
             and any(n == t or n.endswith("." + t) for t in LCM_LORA_TARGETS)]
    state = {}
    for i, path in enumerate(paths):  # distinct values, so a tensor landing on the wrong module is caught
        state[f"unet.{path}.lora_A.weight"] = torch.full((1, 1), float(2 * i))
        state[f"unet.{path}.lora_B.weight"] = torch.full((1, 1), float(2 * i + 1))
    return state, unet.config


def test_sdxl_kohya_names_are_the_sgm_names_real_kohya_files_use():
    _, config = _fake_peft_state(SDXL_LAYOUT)
    # Key names as they appear in kohya sd-scripts SDXL LoRAs (trained on its SGM UNet) and ComfyUI's key map.
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0":
            "input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
        "down_blocks.0.resnets.1.conv1": "input_blocks_2_0_in_layers_2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
        "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
        "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
        "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
        "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.0.proj":
            "output_blocks_5_1_transformer_blocks_1_ff_net_0_proj",
        "up_blocks.2.resnets.2.conv2": "output_blocks_8_0_out_layers_3",
    }
    for path, sgm in expected.items():
        assert kohya_name(path, config) == "lora_unet_" + sgm


# SD1.5's published layout: attention in the first three blocks; kohya names SD1.x modules by their diffusers paths.
SD15_LAYOUT = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


@pytest.mark.parametrize("layout, kind", [(SDXL_LAYOUT, "sdxl"), (OTHER_LAYOUT, "sdxl"), (SD15_LAYOUT, "sd15")],
                         ids=["sdxl", "4-blocks-1-layer", "sd15"])
def test_kohya_keys_round_trip_through_diffusers_converter(layout, kind):
    state, config = _fake_peft_state(layout)
    kohya = peft_to_kohya(state, {"r": 1, "lora_alpha": 3}, config, kind)
    assert len(kohya) == 3 * len(state) // 2 and all(k.startswith("lora_unet_") for k in kohya)
    check_kohya_round_trip(kohya, state, config, kind)  # raises if any tensor lands on another module


def test_a_layout_diffusers_cannot_read_back_is_refused():
    # An upsampler in an up block without attention sits at SGM index 1, which diffusers' SGM reader takes for an
    # attention: the export must refuse rather than write a file that loads onto the wrong modules.
    layout = {**OTHER_LAYOUT, "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
    state, config = _fake_peft_state(layout)
    with pytest.raises(ValueError, match="round-trip"):
        check_kohya_round_trip(peft_to_kohya(state, {"r": 1, "lora_alpha": 1}, config), state, config)


def test_swapped_kohya_names_are_caught():
    state, config = _fake_peft_state(OTHER_LAYOUT)
    kohya = peft_to_kohya(state, {"r": 1, "lora_alpha": 1}, config)
    a, b = sorted(k for k in kohya if k.endswith("lora_up.weight"))[:2]
    kohya[a], kohya[b] = kohya[b], kohya[a]
    with pytest.raises(ValueError, match="round-trip"):
        check_kohya_round_trip(kohya, state, config)


# ---------------------------------------------------------------------------------------------------- lcm export RUN
def test_kohya_export_loads_through_diffusers_with_identical_output(lora_run, tiny_sdxl_dir, tmp_path, caplog):
    assert lcm_main(["export", str(lora_run), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert lcm_main(["export", str(lora_run), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    with safe_open(str(tmp_path / "k" / KOHYA_FILE), "pt") as f:
        keys = list(f.keys())
        alpha = f.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert alpha.numel() == 1 and alpha.item() == ALPHA

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base = _out(pipe.unet)
    pipe.load_lora_weights(str(tmp_path / "d"), adapter_name="peft")
    reference = _out(pipe.unet)
    pipe.unload_lora_weights()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(tmp_path / "k"), weight_name=KOHYA_FILE, adapter_name="kohya")
    messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [m for m in messages if "unexpected keys" in m or "inconsistency" in m or "missing keys" in m], messages
    assert (reference - base).abs().max() > 1e-3, "the LoRA changed nothing; the comparison would prove nothing"
    torch.testing.assert_close(_out(pipe.unet), reference, atol=1e-6, rtol=0)


def test_fused_export_equals_base_plus_lora(lora_run, tiny_sdxl_dir, tmp_path):
    assert lcm_main(["export", str(lora_run), "--format", "fused", "--out", str(tmp_path / "f")]) == 0
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "f", subfolder="unet")
    assert not [n for n, _ in fused.named_parameters() if "lora" in n]
    assert (tmp_path / "f" / "scheduler" / "scheduler_config.json").is_file()

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    unet.load_lora_adapter(str(lora_run / "final"), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    torch.testing.assert_close(_out(fused), _out(unet), atol=1e-5, rtol=0)


def test_export_errors_name_the_problem(lora_run, tmp_path):
    assert set(cli.EXPORT_FORMAT_NAMES) == set(EXPORT_FORMATS)  # the CLI's choices are the registry's keys
    from lcm.export import export_run

    with pytest.raises(ValueError, match="valid: \\['diffusers', 'fused', 'kohya'\\]"):
        export_run(lora_run, "onnx")
    with pytest.raises(FileNotFoundError, match="not a finished training run"):
        export_run(tmp_path, "kohya")


# ---------------------------------------------------------------------------------------------------------- stacking
def test_stacked_lora_weights_are_honoured(lora_run, style_lora, tiny_sdxl_dir):
    off = load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(lora_run), 1.0), (str(style_lora), 0.0)], device="cpu")
    on = load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(lora_run), 1.0), (str(style_lora), 0.8)], device="cpu")
    # set_adapters scales each adapter's alpha / r by its weight, per module.
    to_q = on.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert to_q.scaling["lora0"] == pytest.approx(ALPHA / RANK) and to_q.scaling["lora1"] == pytest.approx(0.8)
    with_style_at_0 = _out(off.unet)
    off.delete_adapters("lora1")  # what remains is the LCM-LoRA alone
    alone = _out(off.unet)
    torch.testing.assert_close(with_style_at_0, alone, atol=1e-6, rtol=0)
    assert (_out(on.unet) - alone).abs().max() > 1e-3


def test_cli_passes_stacked_loras_with_weights(monkeypatch, tiny_sdxl_dir, lora_run, style_lora):
    seen = {}

    def fake_load(base, loras, **kwargs):
        seen.update(loras=loras, preset=kwargs["preset"])
        raise RuntimeError("stop before sampling")

    monkeypatch.setattr("lcm.sampling.load_pipeline_for_sampling", fake_load)
    with pytest.raises(RuntimeError, match="stop"):
        lcm_main(["sample", "--base", str(tiny_sdxl_dir), "--lora", str(lora_run), "--lora", f"{style_lora}:0.8",
                  "--prompt", "a"])
    # the first LoRA is an LCM run: lcm-auto, which at the default 4 steps samples with TCD
    assert seen == {"loras": [(str(lora_run), 1.0), (str(style_lora), 0.8)], "preset": "tcd"}


_SAVE_SCRIPT = """
import sys, torch
from diffusers import StableDiffusionXLPipeline
from lcm.config import LCM_LORA_TARGETS
from lcm.lora import add_lora, save_lora
from lcm.tiny import build_tiny_sdxl_pipeline
pipe = build_tiny_sdxl_pipeline(seed=0)
torch.manual_seed(0)
add_lora(pipe.unet, 4, 4, LCM_LORA_TARGETS)
save_lora(pipe.unet, sys.argv[1], StableDiffusionXLPipeline)
"""


def test_saved_lora_metadata_does_not_depend_on_string_hashing(tmp_path):
    """Same weights → same file contents: PEFT's target_modules set must not leak hash order into the adapter
    metadata (processes with different PYTHONHASHSEED wrote differently ordered target lists before the fix).
    The raw bytes can still differ: safetensors serialises its header map in a per-process order of its own."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    contents = []
    for hash_seed in ("1", "2", "3"):
        out = tmp_path / f"h{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(out)], check=True, env=env, capture_output=True)
        with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
            contents.append((f.metadata(), {k: f.get_tensor(k) for k in f.keys()}))
    for metadata, tensors in contents[1:]:
        assert metadata == contents[0][0]
        assert tensors.keys() == contents[0][1].keys()
        assert all(torch.equal(tensors[k], contents[0][1][k]) for k in tensors)
