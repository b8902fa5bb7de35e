"""Sampling presets (scheduler class + settings + defaults), TCD's eta, and LCM-aware image-to-image."""

import argparse
import functools

import pytest
import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler,
                       TCDScheduler)
from PIL import Image

from lcm import cli
from lcm.cli import main as lcm_main
from lcm.presets import PRESETS, SpreadTCDScheduler, build_scheduler, get_preset
from lcm.sampling import (generate, img2img_pipeline, img2img_steps, lcm_scheduler_for, load_init_image,
                          load_pipeline_for_sampling)

# What each family's model card prescribes (written out here, not read from lcm/presets.py).
EXPECTED = {
    "lcm": (LCMScheduler, {"clip_sample": False}),
    "tcd": (TCDScheduler, {"clip_sample": False}),
    "tcd-spread": (SpreadTCDScheduler, {"clip_sample": False}),  # TCDScheduler on spread timesteps
    "lightning": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "lightning-1step": (EulerDiscreteScheduler, {"timestep_spacing": "trailing", "prediction_type": "sample"}),
    "turbo": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "hyper": (DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False}),
    # PCM: trailing DDIM walks the phase edges and ends on ᾱ = 1, the clean latent (lcm/trajectory.py)
    "pcm": (DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True}),
}


def _teacher_config():
    """An SDXL-like teacher scheduler config (Euler, leading spacing) with Euler-only keys and v-prediction."""
    return EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type="v_prediction", timestep_spacing="leading").config


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_preset_builds_its_scheduler_on_the_teacher_betas(name):
    cls, settings = EXPECTED[name]
    sched = build_scheduler(name, _teacher_config())
    assert type(sched) is cls
    assert {k: sched.config[k] for k in settings} == settings
    assert sched.config.beta_end == 0.012 and sched.config.beta_schedule == "scaled_linear"
    if "prediction_type" not in settings:
        assert sched.config.prediction_type == "v_prediction"  # the teacher's parameterisation is kept
    if cls is not EulerDiscreteScheduler:
        assert "use_karras_sigmas" not in sched.config  # Euler-only keys are dropped, not carried as unused


def test_preset_defaults():
    assert {n: (p.steps, p.guidance) for n, p in PRESETS.items()} == {
        "lcm": (4, 1.0), "tcd": (4, 1.0), "lightning": (4, 0.0), "lightning-1step": (1, 0.0), "turbo": (1, 0.0),
        "hyper": (4, 0.0), "pcm": (4, 1.0), "lcm-auto": (4, 1.0), "tcd-mix-auto": (4, 1.0),
        "tcd-spread": (8, 1.0)}
    assert PRESETS["tcd"].eta == 0.3 and PRESETS["turbo"].size == 512
    # guidance ≤ 1 means diffusers runs no unconditional branch: the distilled families must not get CFG.
    assert all(p.guidance <= 1.0 for p in PRESETS.values())


def test_lcm_preset_matches_the_training_export_and_keeps_a_saved_grid():
    teacher = _teacher_config()
    public = lambda sched: {k: v for k, v in sched.config.items() if not k.startswith("_")}  # noqa: E731
    assert public(build_scheduler("lcm", teacher)) == public(lcm_scheduler_for(teacher))
    saved = dict(lcm_scheduler_for(teacher, original_inference_steps=25).config)  # as in a LoRA's final/scheduler
    assert build_scheduler("tcd", saved).config.original_inference_steps == 25
    assert "original_inference_steps" not in build_scheduler("hyper", saved).config


def test_unknown_preset_lists_the_valid_ones():
    assert set(cli.PRESET_NAMES) == set(PRESETS)  # the CLI's choices are the registry's keys
    valid = ("valid: \\['hyper', 'lcm', 'lcm-auto', 'lightning', 'lightning-1step', 'pcm', 'tcd', 'tcd-mix-auto', "
             "'tcd-spread', 'turbo'\\]")
    with pytest.raises(ValueError, match=valid):
        get_preset("dpm")


def test_cli_fills_unset_options_from_the_preset_and_explicit_values_win():
    unset = dict(steps=None, guidance=None, eta=None, height=None, width=None)
    turbo = cli._with_preset_defaults(argparse.Namespace(preset="turbo", **unset))
    assert (turbo.steps, turbo.guidance, turbo.height, turbo.width) == (1, 0.0, 512, 512)
    mine = cli._with_preset_defaults(argparse.Namespace(preset="tcd", **{**unset, "steps": 8, "eta": 0.0}))
    assert (mine.steps, mine.guidance, mine.eta) == (8, 1.0, 0.0)
    legacy = cli._with_preset_defaults(argparse.Namespace(**{**unset, "steps": 4, "guidance": 1.0}))  # no preset
    assert legacy.preset == "lcm" and legacy.init_image is None


def test_img2img_steps_follow_diffusers_and_refuse_zero():
    assert img2img_steps(4, 0.5) == 2 and img2img_steps(4, 1.0) == 4 and img2img_steps(3, 0.34) == 1
    with pytest.raises(ValueError, match="0 denoising steps.*at least 3"):
        img2img_steps(2, 0.4)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength"):
            img2img_steps(4, bad)


def test_cli_img2img_error_comes_before_any_model_work(tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (16, 16), "red").save(init)
    # The base does not exist: reaching the model loader would raise a different error.
    with pytest.raises(SystemExit, match="0 denoising steps"):
        lcm_main(["sample", "--base", str(tmp_path / "missing"), "--prompt", "a", "--steps", "2",
                  "--init-image", str(init), "--strength", "0.3"])
    with pytest.raises(SystemExit, match="--init-image"):
        lcm_main(["sample", "--base", str(tmp_path / "missing"), "--prompt", "a", "--strength", "0.5"])


def test_tcd_img2img_passes_eta_and_shares_components(tiny_sdxl_dir, monkeypatch):
    seen = []
    step = TCDScheduler.step

    @functools.wraps(step)  # keeps step's signature: the pipeline passes `eta` only to a step() that declares it
    def recording_step(self, *args, **kwargs):
        seen.append(kwargs.get("eta"))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(TCDScheduler, "step", recording_step)
    pipe = load_pipeline_for_sampling(str(tiny_sdxl_dir), preset="tcd", device="cpu")
    i2i = img2img_pipeline(pipe)
    assert type(i2i).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert i2i.unet is pipe.unet and i2i.scheduler is pipe.scheduler  # same weights and preset scheduler, no reload
    init = Image.new("RGB", (24, 16), (200, 40, 40))
    images = generate(i2i, ["a red circle"], [0], steps=4, init_image=init, strength=0.5, eta=PRESETS["tcd"].eta)
    assert images[0].size == (24, 16)
    assert seen == [0.3, 0.3], "int(4 × 0.5) = 2 TCD steps, each with the preset's eta (not the pipeline's 0.0)"


def test_cli_img2img_writes_png_of_requested_size(tiny_sdxl_dir, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (40, 80, 220)).save(init)
    assert load_init_image(init, 16, 24).size == (24, 16)
    out = tmp_path / "i2i.png"
    assert lcm_main(["sample", "--base", str(tiny_sdxl_dir), "--prompt", "a blue square", "--seeds", "0",
                     "--steps", "2", "--init-image", str(init), "--strength", "0.5", "--height", "16",
                     "--width", "24", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (24, 16) and torch.tensor(list(image.getdata())).float().std() > 0


def test_preset_spec_takes_an_eta_after_at():
    from lcm.presets import split_preset_spec

    assert split_preset_spec("tcd") == ("tcd", None)
    assert split_preset_spec("tcd@0.5") == ("tcd", 0.5)
    assert split_preset_spec("lcm@0") == ("lcm", 0.0)
    for bad, match in (("nope@0.5", "unknown sampling preset"), ("tcd@x", "must be a number"),
                       ("tcd@1.5", r"in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            split_preset_spec(bad)


def _fake_run(root, config, *overrides):
    """A run folder as train_lcm_lora.py leaves it (config.yaml + final/pytorch_lora_weights.safetensors), with the
    real config of `config`; the weights file is a placeholder (the preset is read from the config alone)."""
    from lcm.config import load_config, to_yaml

    run = root / config
    (run / "final").mkdir(parents=True)
    (run / "final" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (run / "config.yaml").write_text(to_yaml(load_config(config, list(overrides))))
    return run


def test_cli_infers_the_preset_and_eta_from_the_runs_config_and_an_explicit_preset_wins(tmp_path, capsys):
    unset = dict(preset=None, steps=None, guidance=None, eta=None, height=None, width=None)
    tcd = _fake_run(tmp_path, "mini_tcd_lora", "distill.tcd_gamma=0.6")
    lightning = _fake_run(tmp_path, "mini_lightning_lora")
    lcm_run = _fake_run(tmp_path, "mini_lcm_lora")
    got = cli._with_preset_defaults(argparse.Namespace(**unset), [str(tcd)])
    assert (got.preset, got.eta, got.steps) == ("tcd", 0.6, get_preset("tcd").steps)
    assert "preset tcd (eta 0.6)" in capsys.readouterr().err  # the user is told where the choice came from
    # the weights file itself and the final/ folder find the same run config
    for path in (tcd / "final", tcd / "final" / "pytorch_lora_weights.safetensors"):
        assert cli._with_preset_defaults(argparse.Namespace(**unset), [str(path)]).preset == "tcd"
    got = cli._with_preset_defaults(argparse.Namespace(**unset), [str(lightning)])
    assert (got.preset, got.guidance) == ("lightning", get_preset("lightning").guidance)
    # an LCM-LoRA run is sampled by step count (lcm-auto); `--preset lcm` still means LCMScheduler throughout
    assert cli._with_preset_defaults(argparse.Namespace(**unset), [str(lcm_run)]).preset == "lcm-auto"
    assert cli._with_preset_defaults(argparse.Namespace(**{**unset, "preset": "lcm"}), [str(lcm_run)]).preset == "lcm"
    # explicit values win over the run's: --preset, and --eta under the inferred preset
    assert cli._with_preset_defaults(argparse.Namespace(**{**unset, "preset": "lcm"}), [str(tcd)]).preset == "lcm"
    assert cli._with_preset_defaults(argparse.Namespace(**{**unset, "eta": 0.1}), [str(tcd)]).eta == 0.1
    # a TCD-LoRA with a clean-end share is sampled by step count, its gamma left to the rule (no eta from the run)
    mixed = _fake_run(tmp_path / "mixed", "mini_tcd_lora", "distill.tcd_clean_share=0.5")
    got = cli._with_preset_defaults(argparse.Namespace(**unset), [str(mixed)])
    assert (got.preset, got.eta) == ("tcd-mix-auto", None)
    assert cli._resolved(argparse.Namespace(**{**vars(got), "steps": 6}), "sample") == ("tcd", 0.5)
    assert cli._resolved(argparse.Namespace(**{**vars(got), "steps": 8}), "sample") == ("tcd-spread", 0.5)
    # a LoRA file with no run config beside it (a hub download), or no LoRA at all: lcm
    loose = tmp_path / "elsewhere" / "deep" / "lora.safetensors"
    loose.parent.mkdir(parents=True)
    loose.write_bytes(b"")
    assert cli._with_preset_defaults(argparse.Namespace(**unset), [str(loose)]).preset == "lcm"
    assert cli._with_preset_defaults(argparse.Namespace(**unset), []).preset == "lcm"


def test_lcm_sample_loads_a_tcd_run_with_tcd_and_its_gamma(tiny_sdxl_dir, tmp_path, monkeypatch):
    """End to end through `lcm sample`: a real LoRA run whose config says objective=tcd gets TCDScheduler and the run's
    gamma as eta, with no --preset given."""
    from omegaconf import OmegaConf

    import lcm.sampling
    from tests._helpers import write_lora_run

    run = write_lora_run(tiny_sdxl_dir, tmp_path / "run", rank=4, alpha=4)
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.distill.objective, cfg.distill.tcd_gamma = "tcd", 0.45
    OmegaConf.save(cfg, run / "config.yaml")
    seen = {}

    def spy(pipe, prompts, seeds, steps, guidance, height, width, negative, **kw):
        seen.update(scheduler=type(pipe.scheduler), eta=kw["eta"], steps=steps)
        return generate(pipe, prompts, seeds, steps, guidance, height, width, negative, **kw)

    monkeypatch.setattr(lcm.sampling, "generate", spy)
    assert lcm_main(["sample", "--base", str(tiny_sdxl_dir), "--lora", str(run), "--prompt", "a", "--steps", "2",
                     "--height", "32", "--width", "32", "--out", str(tmp_path / "grid.png")]) == 0
    assert seen == {"scheduler": TCDScheduler, "eta": 0.45, "steps": 2}
    assert (tmp_path / "grid.png").is_file()


def test_tcd_mix_auto_picks_the_sampler_by_step_count():
    """tcd-mix-auto: LCMScheduler at 1–2 steps, TCD at eta 0.7 for 3–4 and 0.5 beyond (sampler_tcdmix_mini), on
    spread timesteps from 7 steps (sampler_spread_tcdmix_mini)."""
    from lcm.presets import resolve_preset

    got = {k: resolve_preset("tcd-mix-auto", k) for k in (1, 2, 3, 4, 5, 6, 7, 8, 50)}
    assert got == {1: ("lcm", None), 2: ("lcm", None), 3: ("tcd", 0.7), 4: ("tcd", 0.7), 5: ("tcd", 0.5),
                   6: ("tcd", 0.5), 7: ("tcd-spread", 0.5), 8: ("tcd-spread", 0.5), 50: ("tcd-spread", 0.5)}


def test_lcm_auto_picks_the_sampler_by_step_count():
    """lcm-auto: LCMScheduler at 1–3 steps, TCD above (eta 0.8 to 6 steps, 0.7 beyond on spread timesteps; the
    sampler_steps_mini and sampler_spread_mini measurements). An explicit eta replaces TCD's and is dropped for LCMScheduler; it cannot be built unresolved."""
    from lcm.presets import resolve_preset

    got = {k: resolve_preset("lcm-auto", k) for k in (1, 2, 3, 4, 5, 6, 7, 8, 50)}
    assert got == {1: ("lcm", None), 2: ("lcm", None), 3: ("lcm", None), 4: ("tcd", 0.8), 5: ("tcd", 0.8),
                   6: ("tcd", 0.8), 7: ("tcd-spread", 0.7), 8: ("tcd-spread", 0.7), 50: ("tcd-spread", 0.7)}
    assert resolve_preset("lcm-auto", 8, 0.5) == ("tcd-spread", 0.5)
    assert resolve_preset("lcm-auto", 2, 0.5) == ("lcm", None)
    # one-sampler presets resolve to themselves, with their own eta unless one is given
    assert resolve_preset("tcd", 8) == ("tcd", 0.3) and resolve_preset("tcd", 8, 0.6) == ("tcd", 0.6)
    assert resolve_preset("lcm", 8) == ("lcm", None)
    with pytest.raises(ValueError, match="resolve_preset"):
        build_scheduler("lcm-auto", _teacher_config())
    with pytest.raises(ValueError, match="steps must be"):
        resolve_preset("lcm-auto", 0)
    with pytest.raises(ValueError, match="unknown sampling preset"):
        resolve_preset("nope", 4)


def test_lcm_sample_samples_an_lcm_lora_run_by_step_count(tiny_sdxl_dir, tmp_path, monkeypatch, capsys):
    """End to end through `lcm sample` with no --preset: an LCM-LoRA run gets LCMScheduler at 2 steps and TCD at eta
    0.7 on the run's own grid at 8, walking timesteps spread down to the grid's bottom; `--preset lcm` keeps
    LCMScheduler at 8, and `--eta` replaces TCD's gamma."""
    import lcm.sampling
    from lcm.presets import spread_timesteps
    from tests._helpers import write_lora_run

    run = write_lora_run(tiny_sdxl_dir, tmp_path / "run", rank=4, alpha=4)
    seen, walked = [], []

    def spy(pipe, prompts, seeds, steps, guidance, height, width, negative, **kw):
        seen.append((type(pipe.scheduler), pipe.scheduler.config.original_inference_steps, kw["eta"], steps))
        images = generate(pipe, prompts, seeds, steps, guidance, height, width, negative, **kw)
        walked.append(pipe.scheduler.timesteps.tolist())
        return images

    monkeypatch.setattr(lcm.sampling, "generate", spy)
    base = ["sample", "--base", str(tiny_sdxl_dir), "--lora", str(run), "--prompt", "a", "--height", "32",
            "--width", "32", "--out", str(tmp_path / "grid.png")]
    saved_n = lcm.sampling.saved_scheduler(lcm.sampling.resolve_lora_dir(str(run))).config.original_inference_steps
    for extra in (["--steps", "2"], ["--steps", "8"], ["--steps", "8", "--preset", "lcm"],
                  ["--steps", "8", "--eta", "0.4"]):
        assert lcm_main(base + extra) == 0
    assert seen == [(LCMScheduler, saved_n, None, 2), (SpreadTCDScheduler, saved_n, 0.7, 8),
                    (LCMScheduler, saved_n, None, 8), (SpreadTCDScheduler, saved_n, 0.4, 8)]
    assert walked[1] == walked[3] == spread_timesteps(1000, saved_n, 8) != walked[2]
    assert "lcm-auto at 8 step(s) samples with tcd-spread (eta 0.7)" in capsys.readouterr().err


def test_the_model_card_of_a_clean_share_tcd_run_names_tcd_mix_auto():
    from lcm.config import load_config
    from lcm.export import _objective_summary

    assert "tcd-mix-auto" in _objective_summary(load_config("mini_tcdmix_lora"))
    assert "tcd-mix-auto" not in _objective_summary(load_config("mini_tcd_lora"))
    assert "validated with gamma" not in _objective_summary(load_config("mini_tcdmix_lora"))  # its eta is the rule's
    from lcm.export import model_card

    # a stock pipeline follows tcd-mix-auto with the exported TCDScheduler and `eta` alone; a plain TCD run keeps gamma
    mixed, plain = model_card(load_config("mini_tcdmix_lora"), 1), model_card(load_config("mini_tcd_lora"), 1)
    assert "by step count (1.0 at 1–2 steps, 0.7 at 3–4 steps, 0.5 from 5 steps)" in mixed
    assert "num_inference_steps=4, guidance_scale=1.0, eta=0.7)" in mixed
    assert "num_inference_steps=4, guidance_scale=1.0, eta=0.3)" in plain and "by step count" not in plain
    # from 7 steps the card gives the spread list for the run's grid (N = 25); a plain TCD run has none
    assert "From 7 steps also pass `timesteps=`" in mixed and "[999, 879, 719, 599, 439, 319, 159, 39]" in mixed
    assert "timesteps=" not in plain


def test_stock_eta_follows_a_by_step_count_preset_with_tcd_alone():
    """The eta a stock TCDScheduler pipeline takes to follow a preset: the TCD rule's eta, 1.0 (full re-noise) where the
    rule is LCMScheduler, None where the preset is neither; and the words for it come from the same table."""
    from lcm.presets import resolve_preset, rule_spans, rule_text, spread_text, stock_eta, stock_eta_text

    for name in ("tcd-mix-auto", "lcm-auto"):
        for k in range(1, 12):
            rule, eta = resolve_preset(name, k)
            assert stock_eta(name, k) == (1.0 if rule == "lcm" else eta)
    assert stock_eta("tcd", 4) == 0.3 and stock_eta("lightning", 4) is None
    assert stock_eta_text("lcm-auto") == "1.0 at 1–3 steps, 0.8 at 4–6 steps, 0.7 from 7 steps"
    assert rule_text("lcm-auto") == ("LCMScheduler at 1–3 steps, TCDScheduler eta 0.8 at 4–6 steps, TCDScheduler on "
                                     "spread timesteps eta 0.7 from 7 steps")
    assert stock_eta_text("tcd-mix-auto") == "1.0 at 1–2 steps, 0.7 at 3–4 steps, 0.5 from 5 steps"  # one eta, said once
    assert rule_text("tcd-mix-auto") == ("LCMScheduler at 1–2 steps, TCDScheduler eta 0.7 at 3–4 steps, TCDScheduler "
                                         "eta 0.5 at 5–6 steps, TCDScheduler on spread timesteps eta 0.5 from 7 steps")
    assert spread_text("tcd-mix-auto", 25) == ("From 7 steps also pass `timesteps=`, spread evenly over the grid down to "
                                               "its lowest point: at 8 steps `timesteps=[999, 879, 719, 599, 439, 319, "
                                               "159, 39]`.")
    assert spread_text("tcd-mix-auto", 6) == "" and spread_text("tcd", 25) == ""  # no spread step count, or none
    assert [span for _, span, _, _ in rule_spans("tcd-mix-auto")] == ["at 1–2 steps", "at 3–4 steps", "at 5–6 steps",
                                                                      "from 7 steps"]


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_tcd_at_eta_1_is_lcm_schedulers_full_renoise_on_the_same_grid(steps):
    """What `stock_eta` rests on: on the run's grid, the exported TCDScheduler walks LCMScheduler's timesteps, and at
    eta 1 each step re-noises its x̂₀ fully as LCMScheduler's does. Only the end point differs (TCD's t = 0 against
    LCMScheduler's boundary scalings), so the two land close; at eta 0.7 TCD keeps part of the sample and does not."""
    from lcm.sampling import lcm_scheduler_for, student_scheduler_for
    from lcm.config import load_config

    base = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    distill = load_config("mini_tcdmix_lora").distill
    lcm = lcm_scheduler_for(base, distill.num_ddim_timesteps, distill.timestep_scaling)
    tcd = student_scheduler_for(distill, base)
    assert type(tcd) is TCDScheduler and tcd.config.original_inference_steps == distill.num_ddim_timesteps
    torch.manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    gaps = {}
    for eta in (1.0, 0.7):
        lcm.set_timesteps(steps)
        tcd.set_timesteps(steps)
        assert tcd.timesteps.tolist() == lcm.timesteps.tolist()
        gap = 0.0
        for t in lcm.timesteps:
            a = lcm.step(eps, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
            b = tcd.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(1)).prev_sample
            gap = max(gap, (a - b).pow(2).mean().sqrt().item())
        gaps[eta] = gap
    # TCD's end point t = 0 keeps sqrt(1 − ᾱ₀) of the predicted noise (≈ 0.029): that is the whole gap at eta 1
    offset = (1 - tcd.alphas_cumprod[0]).sqrt().item()
    assert gaps[1.0] < 1.25 * offset and gaps[0.7] > 3 * offset


@pytest.mark.parametrize("grid_steps", [4, 10, 25, 30, 50])
def test_spread_timesteps_cover_the_whole_grid_evenly(grid_steps):
    """Every step count from 1 to N: that many distinct grid points c·i − 1, descending, from the top of the grid to its
    lowest point, with gaps (in grid indices) that differ by at most one; all N steps are the whole grid. Beyond N, or
    at 0, an error (as TCDScheduler's own stride refuses more steps than grid points)."""
    from lcm.presets import spread_timesteps

    c = 1000 // grid_steps
    grid = [c * i - 1 for i in range(1, grid_steps + 1)]
    for k in range(1, grid_steps + 1):
        ts = spread_timesteps(1000, grid_steps, k)
        assert len(ts) == k and set(ts) <= set(grid) and ts == sorted(ts, reverse=True) and len(set(ts)) == k
        assert ts[0] == grid[-1]
        if k > 1:
            assert ts[-1] == grid[0]
            gaps = [(a - b) // c for a, b in zip(ts, ts[1:])]
            assert max(gaps) - min(gaps) <= 1
    assert spread_timesteps(1000, grid_steps, grid_steps) == grid[::-1]
    for bad in (0, grid_steps + 1):
        with pytest.raises(ValueError, match="spread timesteps"):
            spread_timesteps(1000, grid_steps, bad)


def test_spread_timesteps_at_8_of_25_end_on_the_grid_bottom_where_tcd_stops_at_159():
    """The case the lcm-auto rule is for (issue #13): TCDScheduler's own 8 of the 25-point grid stop at t = 159."""
    from lcm.presets import spread_timesteps

    stock = TCDScheduler(original_inference_steps=25)
    stock.set_timesteps(8)
    assert stock.timesteps.tolist() == [999, 879, 759, 639, 519, 399, 279, 159]
    assert spread_timesteps(1000, 25, 8) == [999, 879, 719, 599, 439, 319, 159, 39]


@pytest.mark.parametrize("steps", [3, 8])
def test_spread_tcd_scheduler_is_stock_tcd_given_the_spread_list(steps):
    """SpreadTCDScheduler at a step count = the stock TCDScheduler called with `timesteps=` the spread list, step by
    step (what a model card tells a diffusers user to pass); custom timesteps and img2img strengths keep TCD's own."""
    from lcm.presets import spread_timesteps

    base = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    spread = build_scheduler("tcd-spread", {**base, "original_inference_steps": 25})
    stock = TCDScheduler.from_config(spread.config)
    assert type(spread) is SpreadTCDScheduler and isinstance(spread, TCDScheduler)
    spread.set_timesteps(steps)
    stock.set_timesteps(timesteps=spread_timesteps(1000, 25, steps))
    assert spread.timesteps.tolist() == stock.timesteps.tolist() == spread_timesteps(1000, 25, steps)
    own = TCDScheduler.from_config(spread.config)
    own.set_timesteps(steps)
    assert spread.timesteps.tolist() != own.timesteps.tolist()  # the stride stops short of the grid's low end
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    a, b = x.clone(), x.clone()
    for t in spread.timesteps:
        eps = torch.sin(a * 3 + t / 100)  # any deterministic model of (sample, t)
        a = spread.step(eps, t, a, eta=0.7, generator=torch.Generator().manual_seed(int(t))).prev_sample
        b = stock.step(torch.sin(b * 3 + t / 100), t, b, eta=0.7, generator=torch.Generator().manual_seed(int(t))
                       ).prev_sample
    assert torch.equal(a, b)
    spread.set_timesteps(timesteps=[999, 499])
    assert spread.timesteps.tolist() == [999, 499]
    spread.set_timesteps(4, strength=0.5)
    own.set_timesteps(4, strength=0.5)
    assert spread.timesteps.tolist() == own.timesteps.tolist()


def test_stock_timesteps_follow_lcm_auto(tiny_sdxl_dir):
    """The list a stock pipeline passes to follow lcm-auto: the spread list where the rule is tcd-spread, None where
    the scheduler's own choice is the rule's; in a real SDXL pipeline the two ways (SpreadTCDScheduler, or stock
    TCDScheduler given `timesteps=` through `generate`, as validation and the card do) walk the same timesteps."""
    from lcm.presets import resolve_preset, spread_timesteps, stock_timesteps

    for k in range(1, 13):
        want = spread_timesteps(1000, 25, k) if resolve_preset("lcm-auto", k)[0] == "tcd-spread" else None
        assert stock_timesteps("lcm-auto", k, 25) == want
    assert stock_timesteps("tcd-mix-auto", 8, 25) == spread_timesteps(1000, 25, 8)
    assert stock_timesteps("tcd-mix-auto", 6, 25) is None and stock_timesteps("tcd", 8, 25) is None
    pipe = load_pipeline_for_sampling(str(tiny_sdxl_dir), [], device="cpu", preset="tcd-spread")
    grid = pipe.scheduler.config.original_inference_steps
    ours = generate(pipe, ["a"], [0], 4, 1.0, 32, 32, eta=0.7)
    walked = pipe.scheduler.timesteps.tolist()
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    stock = generate(pipe, ["a"], [0], 4, 1.0, 32, 32, eta=0.7, timesteps=spread_timesteps(1000, grid, 4))
    assert walked == spread_timesteps(1000, grid, 4) == pipe.scheduler.timesteps.tolist()
    assert list(ours[0].getdata()) == list(stock[0].getdata())
