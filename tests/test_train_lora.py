"""End-to-end smoke test of train_lcm_lora.py on a tiny SDXL teacher: train, resume, export, reload in diffusers."""

import json
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from lcm.cli import main as lcm_main
from lcm.config import ConfigError
from lcm.lora import add_lora, load_lora_into_training_unet
from lcm.tiny import make_captioned_image_folder

from _helpers import load_entry_script, sdxl_unet_inputs

ROOT = Path(__file__).resolve().parents[1]


_script = load_entry_script


def _args(teacher, data, out, *extra, kind="sdxl"):
    return ["--config", "demo_lcm_lora", f"model.pretrained={teacher}", f"model.kind={kind}", f"data.path={data}",
            f"train.output_dir={out}", "data.resolution=16", "train.batch_size=2", "train.report_to=none",
            "lora.rank=4", "lora.alpha=4", "validation.every_n_steps=0", *extra]


_unet_inputs = sdxl_unet_inputs


# The grid N and the boundary scaling s are trained with values other than the defaults (50, 10), which are also
# LCMScheduler's own: an export that dropped them would still show the defaults and pass.
GRID = ("distill.num_ddim_timesteps=20", "distill.timestep_scaling=5.0")


@pytest.fixture(scope="module")
def trained_run(tiny_sdxl_dir, tmp_path_factory):
    """Train 2 steps (checkpoint at 2, validation grid at 2), then resume from `latest` to step 3 and export."""
    tmp = tmp_path_factory.mktemp("run")
    data = make_captioned_image_folder(tmp / "data", n=6, size=24)
    out = tmp / "run"
    train = _script("train_lcm_lora")
    assert train.main(_args(tiny_sdxl_dir, data, out, *GRID, "train.max_train_steps=2", "train.checkpoint_every=2",
                            "validation.every_n_steps=2", "validation.seeds=[0,1]")) == 0
    assert train.main(_args(tiny_sdxl_dir, data, out, *GRID, "train.max_train_steps=3", "train.checkpoint_every=1",
                            "--resume", "latest")) == 0
    return out


def test_resume_continues_from_latest_checkpoint(trained_run):
    steps = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    # The resumed run started at step 2: it never re-made step 1, and wrote step 3.
    assert steps == ["step-000002", "step-000003"]
    assert json.loads((trained_run / "checkpoints/step-000003/counters.json").read_text()) == {"global_step": 3}
    assert (trained_run / "config.yaml").read_text().count("max_train_steps: 3") == 1
    # Adapters only: a checkpoint does not carry the frozen base UNet.
    assert not list((trained_run / "checkpoints/step-000003").glob("model*.safetensors"))
    assert Image.open(trained_run / "samples/step-000002.png").size == (2 * 16, 2 * 16)
    # report_to=none, yet the scalars are kept: the last step of each run (log_every 10 > 3), the resumed run appended
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["lr"] > 0 and "grad_norm" in r for r in rows)


def test_exported_lora_loads_in_diffusers_and_matches_training_model(trained_run, tiny_sdxl_dir, caplog):
    final = trained_run / "final"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base_out = pipe.unet(**_unet_inputs(pipe.unet)).sample
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(final))
    # Neither diffusers' "unexpected keys" nor PEFT's "inconsistency between config and state_dict" (which is how a
    # silently dropped group of adapter tensors shows up) may appear.
    messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [m for m in messages if "unexpected keys" in m or "inconsistency" in m], messages
    lora_out = pipe.unet(**_unet_inputs(pipe.unet)).sample
    assert (lora_out - base_out).abs().max() > 1e-4, "the LoRA changed nothing"

    # The PEFT model as training held it: fresh base + adapter tensors from the last checkpoint (same step as final).
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    add_lora(unet, rank=4, alpha=4, target_modules=__import__("lcm.config").config.LCM_LORA_TARGETS)
    load_lora_into_training_unet(unet, load_file(trained_run / "checkpoints/step-000003/lora_adapter.safetensors"))
    torch.testing.assert_close(unet(**_unet_inputs(unet)).sample, lora_out, atol=1e-5, rtol=0)


def test_exported_scheduler_and_card(trained_run):
    sched = LCMScheduler.from_pretrained(trained_run / "final", subfolder="scheduler")
    assert sched.config.original_inference_steps == 20 and sched.config.timestep_scaling == 5.0  # as trained (GRID)
    assert sched.config.clip_sample is False
    card = (trained_run / "final/README.md").read_text()
    assert "base model" in card and "N = 20" in card
    assert "`eta=0.8` at 4–6 steps, `eta=0.7` from 7 steps" in card  # lcm-auto's TCD rule (issue #13)
    # from 7 steps on timesteps spread down to the bottom of the run's own grid (N = 20: indices 19 16 14 11 8 5 3 0)
    assert ("From 7 steps also pass `timesteps=`, spread evenly over the grid down to its lowest point: at 8 steps "
            "`timesteps=[999, 849, 749, 599, 449, 299, 199, 49]`") in card


def test_only_consistency_cards_carry_the_tcd_tip():
    from lcm.config import load_config
    from lcm.export import model_card

    assert "At 1–3 steps keep `LCMScheduler`" in model_card(load_config("mini_lcm_lora"), 1)
    for config in ("mini_tcd_lora", "mini_add_lora", "mini_lightning_lora", "mini_pcm_lora"):
        assert "keep `LCMScheduler`" not in model_card(load_config(config), 1), config


def test_lcm_sample_writes_pngs_of_requested_size(trained_run, tiny_sdxl_dir, tmp_path):
    out = tmp_path / "imgs"
    assert lcm_main(["sample", "--base", str(tiny_sdxl_dir), "--lora", f"{trained_run}:0.8", "--prompt", "a red circle",
                     "--seeds", "0-1", "--steps", "2", "--height", "16", "--width", "24", "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2 and all(Image.open(f).size == (24, 16) for f in files)
    grid = tmp_path / "grid.png"
    lcm_main(["sample", "--base", str(tiny_sdxl_dir), "--lora", str(trained_run), "--fuse", "--prompt", "a",
              "--prompt", "b", "--seeds", "3,4", "--steps", "1", "--height", "16", "--width", "16", "--out", str(grid)])
    assert Image.open(grid).size == (2 * 16, 2 * 16)


def test_sd15_trains_and_exports(tiny_sd15_dir, tmp_path):
    data = make_captioned_image_folder(tmp_path / "data", n=4, size=16)
    train = _script("train_lcm_lora")
    assert train.main(_args(tiny_sd15_dir, data, tmp_path / "run", "train.max_train_steps=1", kind="sd15")) == 0
    assert (tmp_path / "run/final/pytorch_lora_weights.safetensors").is_file()


def test_bad_config_key_is_named(tmp_path):
    train = _script("train_lcm_lora")
    with pytest.raises(ConfigError, match="train.bogus"):
        train.main(_args("x", "y", tmp_path, "train.bogus=1"))
    with pytest.raises(ConfigError, match="distill.loss"):
        train.main(_args("x", "y", tmp_path, "distill.loss=l1"))


def test_dry_run_prints_resolved_config(capsys, tmp_path):
    assert _script("train_lcm_lora").main(_args("teacher", "data", tmp_path, "lora.rank=7", "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "rank: 7" in printed and "pretrained: teacher" in printed
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("fused_lowp", ["false", "true"])
def test_ema_target_bf16_and_gradient_checkpointing(tiny_sdxl_dir, tmp_path, fused_lowp):
    """Adapter-only EMA is checkpointed and lags the online adapters; bf16 autocast (with lcm/cpu_lowp.py's kernels,
    and with the LoRA fused in bf16), gradient checkpointing and accumulation (2 micro-batches per optimiser step)
    run on CPU."""
    data = make_captioned_image_folder(tmp_path / "data", n=4, size=16)
    out = tmp_path / "run"
    assert _script("train_lcm_lora").main(_args(
        tiny_sdxl_dir, data, out, "train.max_train_steps=2", "train.checkpoint_every=2", "distill.ema_decay=0.5",
        "train.mixed_precision=bf16", "train.gradient_checkpointing=true", "train.batch_size=1",
        "train.gradient_accumulation_steps=2", f"lora.fused_lowp={fused_lowp}")) == 0
    ckpt = out / "checkpoints/step-000002"
    ema = load_file(ckpt / "extra_state.safetensors")
    online = load_file(ckpt / "lora_adapter.safetensors")
    assert len(ema) == len(online)
    assert all(t.dtype == torch.float32 for t in online.values()), "adapters must stay fp32 under bf16"
    # lora_B starts at zero; after two updates the online B moved and the EMA (μ = 0.5) sits strictly in between.
    b_keys = [k for k in sorted(online) if "lora_B" in k]
    b_online = torch.cat([online[k].flatten() for k in b_keys])
    b_ema = torch.cat([ema["ema." + k.replace("lora_B.weight", "lora_B.default.weight")].flatten() for k in b_keys])
    assert b_online.abs().max() > 0
    assert 0 < b_ema.norm() < b_online.norm()


def test_lcm_demo_tiny_runs_the_whole_path(tmp_path):
    """The README's main job in its fast form: teacher + folder → train_lcm_lora.py (child process) → 4-step grid."""
    root = tmp_path / "demo"
    assert lcm_main(["demo", "--tiny", "--root", str(root), "train.max_train_steps=2", "train.report_to=none",
                     "validation.every_n_steps=0", "train.checkpoint_every=0"]) == 0
    assert (root / "lcm-lora/final/pytorch_lora_weights.safetensors").is_file()
    assert Image.open(root / "grid.png").size == (8 * 32, 2 * 32)


def test_lcm_sample_refuses_lora_of_another_base_naming_the_module(trained_run, tmp_path):
    from lcm.tiny import save_tiny_pipeline

    other = save_tiny_pipeline("sdxl", tmp_path / "narrow", block_out_channels=(16, 32))
    with pytest.raises(ValueError, match=r"down_blocks\.0"):
        lcm_main(["sample", "--base", str(other), "--lora", str(trained_run), "--prompt", "a", "--seeds", "0",
                  "--steps", "1", "--height", "16", "--width", "16", "--out", str(tmp_path / "x.png")])


def test_lcm_eval_samples_a_lora_on_the_grid_it_trained_on(trained_run, tiny_sdxl_dir):
    """The run trained on N = 20 with timestep_scaling 5: its `lcm eval` row uses them, whatever the table's N."""
    from lcm.evaluate import ROW_KINDS, RowSetup

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    with ROW_KINDS["lora"](RowSetup(pipe, pipe.scheduler.config, [4], [], 1.5, 1.0, 50), "LCM-LoRA", str(trained_run)):
        assert isinstance(pipe.scheduler, LCMScheduler)
        assert pipe.scheduler.config.original_inference_steps == 20
        assert pipe.scheduler.config.timestep_scaling == 5.0


def test_lcm_eval_student_preset_keeps_the_run_grid_and_passes_eta(trained_run, tiny_sdxl_dir):
    """`--student NAME=RUN:tcd`: TCDScheduler on the run's N = 20 and scaling 5 (not the table's N), with TCD's eta."""
    from diffusers import TCDScheduler

    from lcm.evaluate import ROW_KINDS, RowSetup

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    setup = RowSetup(pipe, pipe.scheduler.config, [4], [], 1.5, 1.0, 50, preset="tcd")
    with ROW_KINDS["lora"](setup, "tcd-row", str(trained_run)):
        assert isinstance(pipe.scheduler, TCDScheduler)
        assert pipe.scheduler.config.original_inference_steps == 20
        assert pipe.scheduler.config.timestep_scaling == 5.0
        assert pipe.scheduler.betas.equal(TCDScheduler.from_config(setup.base_config).betas)


def test_lcm_eval_named_students_with_and_without_a_preset(trained_run, tiny_sdxl_dir, tmp_path):
    """Two rows of one LoRA run: as saved (LCMScheduler) and under `:tcd` (stochastic, eta 0.3) differ; each row is
    the pipeline's own output for that scheduler, and a name clash or a folder with no student is an error."""
    import json

    from lcm.evaluate import evaluate, sample_tensors
    from lcm.sampling import load_pipeline_for_sampling

    out = tmp_path / "eval"
    rows = evaluate(str(tiny_sdxl_dir), None, out, n=10, steps=[2], teacher_extra_steps=[], methods=["A", "B"],
                    students=[("A", str(trained_run), None), ("B", str(trained_run), "tcd")])
    assert [(r.method, r.steps) for r in rows] == [("A", 2), ("B", 2)]
    assert rows[0].frechet != rows[1].frechet
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["A", "B"]
    # Row B is `lcm sample --preset tcd` on the same LoRA: same prompts and seeds give the same images.
    from lcm.digits import eval_prompts

    prompts, _ = eval_prompts(10, "train")
    pipe = load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(trained_run), 1.0)], fuse=True, preset="tcd",
                                      device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    images, _ = sample_tensors(pipe, prompts, list(range(10)), 2, 1.0, eta=0.3)
    from lcm.classifier import digit_features, frechet_distance
    from lcm.digits import load_digits_tensors

    real, _ = load_digits_tensors("held_out", size=images.shape[-1])
    assert frechet_distance(digit_features(images), digit_features(real)) == pytest.approx(rows[1].frechet, rel=1e-4)
    # `:tcd@0.9` is the same sampler at eta 0.9: `lcm sample --preset tcd --eta 0.9`'s images, unlike eta 0.3's.
    other = evaluate(str(tiny_sdxl_dir), None, out, n=10, steps=[2], teacher_extra_steps=[], methods=["C"],
                     students=[("C", str(trained_run), "tcd@0.9")])
    images_09, _ = sample_tensors(pipe, prompts, list(range(10)), 2, 1.0, eta=0.9)
    assert not images_09.equal(images)
    assert frechet_distance(digit_features(images_09), digit_features(real)) == pytest.approx(other[0].frechet,
                                                                                              rel=1e-4)
    with pytest.raises(ValueError, match="taken"):
        evaluate(str(tiny_sdxl_dir), None, out, n=2, steps=[1], students=[("DDIM", str(trained_run), None)])
    # The name LCM-LoRA is free for a --student row when no --lora holds it, and taken when one does.
    named = evaluate(str(tiny_sdxl_dir), None, out, n=10, steps=[2], teacher_extra_steps=[], methods=["LCM-LoRA"],
                     students=[("LCM-LoRA", str(trained_run), None)])
    assert [(r.method, r.frechet) for r in named] == [("LCM-LoRA", rows[0].frechet)]
    with pytest.raises(ValueError, match="taken"):
        evaluate(str(tiny_sdxl_dir), str(trained_run), out, n=2, steps=[1],
                 students=[("LCM-LoRA", str(trained_run), None)])
    with pytest.raises(FileNotFoundError, match="neither LoRA"):
        evaluate(str(tiny_sdxl_dir), None, out, n=2, steps=[1], students=[("A", str(tmp_path / "nothing"), None)])


def test_lcm_eval_lcm_auto_row_is_lcm_then_tcd_by_step_count(trained_run, tiny_sdxl_dir, tmp_path):
    """`--student NAME=RUN:lcm-auto`: at 2 steps the row is the `:lcm` row, at 4 steps the `:tcd@0.8` row, at 8 the
    `:tcd-spread@0.7` row (the rule's sampler and eta on the run's grid), cell for cell; and an eta after @ replaces
    the rule's."""
    from lcm.evaluate import evaluate

    common = dict(n=10, steps=[2, 4], teacher_extra_steps=[], methods=["auto", "lcm", "tcd"])
    rows = evaluate(str(tiny_sdxl_dir), None, tmp_path / "a", **common,
                    students=[("auto", str(trained_run), "lcm-auto"), ("lcm", str(trained_run), "lcm"),
                              ("tcd", str(trained_run), "tcd@0.8")])
    fd = {(r.method, r.steps): r.frechet for r in rows}
    assert fd[("auto", 2)] == pytest.approx(fd[("lcm", 2)], rel=1e-6)
    assert fd[("auto", 4)] == pytest.approx(fd[("tcd", 4)], rel=1e-6)
    assert abs(fd[("lcm", 4)] / fd[("tcd", 4)] - 1) > 1e-4  # the two samplers differ at 4 steps
    again = evaluate(str(tiny_sdxl_dir), None, tmp_path / "b", n=10, steps=[4], teacher_extra_steps=[],
                     methods=["auto", "tcd"], students=[("auto", str(trained_run), "lcm-auto@0.5"),
                                                        ("tcd", str(trained_run), "tcd@0.5")])
    assert again[0].frechet == pytest.approx(again[1].frechet, rel=1e-6)
    # from 7 steps the rule walks timesteps spread down to the grid's bottom: the `:tcd-spread@0.7` row, not TCD's own
    eight = evaluate(str(tiny_sdxl_dir), None, tmp_path / "c", n=10, steps=[8], teacher_extra_steps=[],
                     methods=["auto", "spread", "tcd"], students=[("auto", str(trained_run), "lcm-auto"),
                                                                  ("spread", str(trained_run), "tcd-spread@0.7"),
                                                                  ("tcd", str(trained_run), "tcd@0.7")])
    assert eight[0].frechet == pytest.approx(eight[1].frechet, rel=1e-6)
    assert abs(eight[1].frechet / eight[2].frechet - 1) > 1e-4


def test_lcm_eval_samples_a_clean_share_tcd_run_with_its_cards_eta_by_step_count(trained_run, tiny_sdxl_dir,
                                                                                  tmp_path):
    """A TCD run with a clean-end share, sampled as saved (its TCDScheduler): eta 1.0 at 2 steps and 0.7 at 4, the
    card's rule (`stock_eta` of tcd-mix-auto), cell for cell the `:tcd@1.0` and `:tcd@0.7` rows, and at 8 steps eta
    0.5 on the card's spread `timesteps=`, the `:tcd-spread@0.5` row; validation's eta follows the same rule, and a
    plain TCD run keeps its gamma and TCD's own timesteps at every step count."""
    import shutil

    from diffusers import TCDScheduler
    from omegaconf import OmegaConf

    from lcm.evaluate import evaluate
    from lcm.presets import spread_timesteps
    from lcm.sampling import saved_eta, saved_timesteps, student_eta, student_timesteps

    run = tmp_path / "mixed"
    shutil.copytree(trained_run / "final", run / "final")
    cfg = OmegaConf.load(trained_run / "config.yaml")
    cfg.distill.objective, cfg.distill.tcd_clean_share = "tcd", 0.5
    OmegaConf.save(cfg, run / "config.yaml")
    saved = LCMScheduler.from_pretrained(run / "final", subfolder="scheduler")
    shutil.rmtree(run / "final" / "scheduler")
    TCDScheduler.from_config(saved.config).save_pretrained(run / "final" / "scheduler")  # as a TCD run exports it
    assert [saved_eta(run, k) for k in (1, 2, 3, 4, 8)] == [1.0, 1.0, 0.7, 0.7, 0.5]
    assert saved_eta(run) == cfg.distill.tcd_gamma == student_eta(cfg.distill)
    n = cfg.distill.num_ddim_timesteps
    assert [saved_timesteps(run, k) for k in (2, 4, 6)] == [None] * 3
    assert saved_timesteps(run, 8) == spread_timesteps(1000, n, 8) == student_timesteps(cfg.distill, 8)
    cfg.distill.tcd_clean_share = 0.0
    assert {student_eta(cfg.distill, k) for k in (1, 2, 4, 8)} == {cfg.distill.tcd_gamma}
    assert {str(student_timesteps(cfg.distill, k)) for k in (1, 2, 4, 8)} == {"None"}

    rows = evaluate(str(tiny_sdxl_dir), None, tmp_path / "eval", n=10, steps=[2, 4], teacher_extra_steps=[],
                    methods=["mix", "t1", "t07"], students=[("mix", str(run), None), ("t1", str(run), "tcd@1.0"),
                                                            ("t07", str(run), "tcd@0.7")])
    fd = {(r.method, r.steps): r.frechet for r in rows}
    assert fd["mix", 2] == pytest.approx(fd["t1", 2], rel=1e-6) and fd["mix", 4] == pytest.approx(fd["t07", 4], rel=1e-6)
    assert fd["mix", 4] != pytest.approx(fd["t1", 4], rel=1e-6)
    eight = evaluate(str(tiny_sdxl_dir), None, tmp_path / "eval8", n=10, steps=[8], teacher_extra_steps=[],
                     methods=["mix", "s05", "t05"], students=[("mix", str(run), None), ("s05", str(run), "tcd-spread@0.5"),
                                                              ("t05", str(run), "tcd@0.5")])
    assert eight[0].frechet == pytest.approx(eight[1].frechet, rel=1e-6)
    assert abs(eight[0].frechet / eight[2].frechet - 1) > 1e-4


def test_student_argument_parses_name_run_and_preset():
    import argparse

    from lcm.cli import _named_student_arg

    assert _named_student_arg("lcm=runs/a") == ("lcm", "runs/a", None)
    assert _named_student_arg("t=runs/a:tcd") == ("t", "runs/a", "tcd")
    assert _named_student_arg("t=runs/a:b") == ("t", "runs/a:b", None)  # not a preset: part of the path
    assert _named_student_arg("t=runs/a:tcd@0.5") == ("t", "runs/a", "tcd@0.5")
    for bad in ("runs/a", "=runs/a", "a=", "x/y=runs/a", "t=runs/a:tcd@x", "t=runs/a:tcd@1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            _named_student_arg(bad)


def test_normal_cfg_config_needs_w_zero(tiny_sdxl_dir, tmp_path):
    with pytest.raises(ConfigError, match="distill.teacher_cfg=false.*distill.w_min"):
        _script("train_lcm_lora").main(_args(tiny_sdxl_dir, tmp_path, tmp_path / "o", "distill.teacher_cfg=false",
                                             "--dry-run"))


def test_guidance_warnings_know_the_student_kind():
    from lcm.sampling import guidance_warnings

    assert guidance_warnings([False], 1.0, None) == [] and guidance_warnings([True], 4.0, "seven") == []
    assert "expects guidance_scale 3–8" in guidance_warnings([True], 1.0, None)[0]
    assert "negative prompt does nothing" in guidance_warnings([True], 1.0, "seven")[0]
    distilled, unknown = guidance_warnings([False], 1.0, "seven")[0], guidance_warnings([None], 1.0, "seven")[0]
    assert "no effect" in distilled and "distill.teacher_cfg=false" in distilled
    assert "no effect" in unknown and "teacher_cfg" not in unknown


def test_normal_cfg_lora_follows_the_negative_prompt_and_lcm_lora_does_not(trained_run, tiny_sdxl_dir, tmp_path):
    """A normal-CFG LoRA (unguided teacher, no w) is tagged so in its model card and its samples change with the
    negative prompt at guidance 4; the (distilled-CFG) LCM-LoRA's samples at guidance 1 do not."""
    from lcm.export import is_normal_cfg
    from lcm.sampling import generate, load_pipeline_for_sampling

    data = make_captioned_image_folder(tmp_path / "data", n=4, size=24)
    out = tmp_path / "ncfg"
    assert _script("train_lcm_lora").main(_args(tiny_sdxl_dir, data, out, *GRID, "train.max_train_steps=2",
                                                "train.checkpoint_every=0", "distill.teacher_cfg=false",
                                                "distill.w_min=0", "distill.w_max=0")) == 0
    assert is_normal_cfg(out / "final") is True and is_normal_cfg(trained_run / "final") is False
    assert "normal-CFG" in (out / "final/README.md").read_text()

    def images(run, guidance, negative):
        pipe = load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(run), 1.0)], device="cpu", dtype="fp32")
        return [torch.tensor(list(im.getdata())) for im in
                generate(pipe, ["a red circle"], [0], 2, guidance, 16, 16, negative)]

    ncfg = images(out, 4.0, None), images(out, 4.0, "a blue square")
    assert not all(torch.equal(a, b) for a, b in zip(*ncfg))
    lcm = images(trained_run, 1.0, None), images(trained_run, 1.0, "a blue square")
    assert all(torch.equal(a, b) for a, b in zip(*lcm))


def test_every_distill_option_of_the_loss_reaches_the_run_spec(tiny_sdxl_dir, tmp_path):
    """prepare_run builds LCDSpec from config.distill: each shared field, set away from its default, must arrive
    under its own name (a positional argument out of place would hand one option another's value)."""
    import dataclasses

    from lcm.config import DistillConfig, LCMLoraConfig
    from lcm.consistency import LCDSpec
    from lcm.entry import parse_train_args, prepare_run

    data = make_captioned_image_folder(tmp_path / "data", n=2, size=16)
    overrides = ["distill.solver=euler", "distill.loss=l2", "distill.huber_c=0.02", "distill.sigma_data=0.4",
                 "distill.timestep_scaling=7.0", "distill.teacher_batched=false",
                 "distill.loss_weighting=inverse_delta", "distill.teacher_cfg=false", "distill.w_min=0",
                 "distill.w_max=0", "distill.terminal_pure_noise=true", "distill.top_index_share=0.25"]
    run = prepare_run(parse_train_args(_args(tiny_sdxl_dir, data, tmp_path / "o", *overrides), "", ""),
                      LCMLoraConfig)
    shared = {f.name for f in dataclasses.fields(LCDSpec)} & {f.name for f in dataclasses.fields(DistillConfig)}
    assert {"terminal_pure_noise", "teacher_cfg", "loss_weighting", "huber_c"} <= shared
    for name in shared:
        assert getattr(run.spec, name) == getattr(run.cfg.distill, name) != getattr(DistillConfig(), name), name
    assert run.spec.grid.top_share == 0.25 and run.spec.grid.N == run.cfg.distill.num_ddim_timesteps


def test_self_input_share_reaches_the_training_step(tiny_sdxl_dir, tmp_path):
    """distill.self_input_share > 0 changes what the step trains on (another loss and LoRA from the same seed); 0 is
    the plain run, repeated exactly."""
    data = make_captioned_image_folder(tmp_path / "data", n=6, size=24)
    train = _script("train_lcm_lora")
    lora = {}
    for name, extra in (("plain", ()), ("again", ()), ("self", ("distill.self_input_share=0.9",))):
        out = tmp_path / name
        assert train.main(_args(tiny_sdxl_dir, data, out, "train.max_train_steps=2", "train.log_every=1",
                                "train.seed=3", *extra)) == 0
        lora[name] = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert all(lora["plain"][k].equal(lora["again"][k]) for k in lora["plain"])
    assert any(not lora["plain"][k].equal(lora["self"][k]) for k in lora["plain"])
