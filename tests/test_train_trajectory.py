"""distill.objective=pcm | tcd through both entry scripts on a tiny SDXL teacher: M = 1 PCM trains LCD's LoRA bit
for bit, and each run's validation grid is exactly what `lcm sample` with the exported scheduler draws."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lcm.tiny import make_captioned_image_folder

from _helpers import load_entry_script, sample_cli

PROMPTS = ["a red circle", "a blue square"]


def _args(teacher, data, out, *extra):
    return ["--config", "demo_lcm_lora", f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={out}",
            "data.resolution=16", "train.batch_size=2", "train.report_to=none", "validation.every_n_steps=0",
            "train.max_train_steps=2", "train.checkpoint_every=2", "train.seed=5", "lora.rank=4", "lora.alpha=4",
            *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_captioned_image_folder(tmp_path_factory.mktemp("trajectory") / "data", n=4, size=24)


def test_pcm_with_one_phase_trains_the_same_lora_as_lcd(tiny_sdxl_dir, data, tmp_path):
    train = load_entry_script("train_lcm_lora")
    assert train.main(_args(tiny_sdxl_dir, data, tmp_path / "lcd")) == 0
    assert train.main(_args(tiny_sdxl_dir, data, tmp_path / "pcm1", "distill.objective=pcm", "distill.phases=1")) == 0
    assert train.main(_args(tiny_sdxl_dir, data, tmp_path / "pcm2", "distill.objective=pcm", "distill.phases=2")) == 0
    a, b, c = (load_file(tmp_path / f"{r}/final/pytorch_lora_weights.safetensors") for r in ("lcd", "pcm1", "pcm2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # two phases train something else


def _sample_cli(teacher, run, out, *extra):
    return sample_cli(teacher, run, out, PROMPTS, *extra)


def _validation_args(steps):
    # fused_forward off: validation then runs PEFT's own LoRA forward, the one a loaded pipeline runs
    return ("lora.fused_forward=false", "validation.every_n_steps=2", f"validation.num_inference_steps={steps}",
            "validation.seeds=[0,1]", f"validation.prompts=[{','.join(PROMPTS)}]")


def test_pcm_run_samples_bit_for_bit_with_lcm_sample_preset_pcm(tiny_sdxl_dir, data, tmp_path):
    """The PCM trainer validates with DDIM trailing at M steps and exports it; the exported scheduler's timesteps are
    the phase tops, and `lcm sample --preset pcm --steps M` on the LoRA draws the validation grid's pixels."""
    from diffusers import DDIMScheduler

    from lcm.schedule import SolverGrid
    from lcm.trajectory import phase_timesteps

    out = tmp_path / "pcm"
    assert load_entry_script("train_lcm_lora").main(_args(
        tiny_sdxl_dir, data, out, "distill.objective=pcm", "distill.num_ddim_timesteps=20", "distill.phases=4",
        *_validation_args(4))) == 0
    saved = DDIMScheduler.from_pretrained(str(out / "final"), subfolder="scheduler")
    assert saved.config.timestep_spacing == "trailing" and saved.config.set_alpha_to_one
    assert not saved.config.clip_sample
    saved.set_timesteps(4)
    assert saved.timesteps.tolist() == phase_timesteps(SolverGrid(1000, 20), 4) == [999, 749, 499, 249]
    sampled = _sample_cli(tiny_sdxl_dir, out, tmp_path / "cli.png", "--preset", "pcm", "--steps", "4")
    trained = np.asarray(Image.open(out / "samples/step-000002.png"))
    assert trained.shape == sampled.shape and np.array_equal(trained, sampled)
    card = (out / "final/README.md").read_text()
    assert "PCM-LoRA" in card and "4 phases of 5 grid points" in card and "num_inference_steps=4" in card


def test_tcd_run_samples_bit_for_bit_with_lcm_sample_preset_tcd(tiny_sdxl_dir, data, tmp_path):
    """The TCD trainer validates with TCDScheduler on the trained grid at its gamma and exports both; `lcm sample
    --preset tcd --eta GAMMA` draws the same pixels (the stochastic steps included), another gamma does not."""
    from diffusers import TCDScheduler

    out = tmp_path / "tcd"
    assert load_entry_script("train_lcm_lora").main(_args(
        tiny_sdxl_dir, data, out, "distill.objective=tcd", "distill.num_ddim_timesteps=20", "distill.tcd_gamma=0.6",
        *_validation_args(4))) == 0
    saved = TCDScheduler.from_pretrained(str(out / "final"), subfolder="scheduler")
    assert saved.config.original_inference_steps == 20
    trained = np.asarray(Image.open(out / "samples/step-000002.png"))
    same = _sample_cli(tiny_sdxl_dir, out, tmp_path / "cli.png", "--preset", "tcd", "--steps", "4", "--eta", "0.6")
    assert trained.shape == same.shape and np.array_equal(trained, same)
    other = _sample_cli(tiny_sdxl_dir, out, tmp_path / "cli0.png", "--preset", "tcd", "--steps", "4", "--eta", "0")
    assert not np.array_equal(trained, other)
    card = (out / "final/README.md").read_text()
    assert "TCD-LoRA" in card and "gamma = 0.6" in card and "eta=0.6" in card
    # `lcm eval --student T=RUN` (no preset) samples the run as saved at the gamma it validated with: the same row
    # as `:tcd@0.6`, another row than `:tcd@0`.
    from lcm.evaluate import evaluate

    rows = evaluate(str(tiny_sdxl_dir), None, tmp_path / "eval", n=6, steps=[4], teacher_extra_steps=[],
                    methods=["saved", "g06", "g0"], students=[("saved", str(out), None), ("g06", str(out), "tcd@0.6"),
                                                              ("g0", str(out), "tcd@0")])
    assert rows[0].frechet == rows[1].frechet != rows[2].frechet


@pytest.mark.parametrize("objective,extra,scheduler", [("pcm", "distill.phases=2", "DDIMScheduler"),
                                                      ("tcd", "distill.tcd_gamma=0.3", "TCDScheduler")])
def test_train_lcd_trains_a_whole_unet_with_pcm_and_tcd(tmp_path, objective, extra, scheduler):
    import json

    from test_train_lcd import _tiny_lcd_run

    out = _tiny_lcd_run(tmp_path, f"distill.objective={objective}", extra, "distill.num_ddim_timesteps=20",
                        "train.max_train_steps=2", "train.checkpoint_every=2")
    assert (out / "final/unet/config.json").is_file()
    saved = json.loads((out / "final/scheduler/scheduler_config.json").read_text())
    assert saved["_class_name"] == scheduler


def test_pcm_phases_that_do_not_divide_the_grid_are_a_config_error(tiny_sdxl_dir, data, tmp_path):
    from lcm.config import ConfigError

    with pytest.raises((ConfigError, SystemExit), match="distill.phases=3 must divide"):
        load_entry_script("train_lcm_lora").main(_args(tiny_sdxl_dir, data, tmp_path / "bad", "distill.objective=pcm",
                                                       "distill.phases=3"))
