"""The adversarial objectives (lcm/objectives.py, lcm/objective_task.py): weight 0 is plain LCD bit for bit, the
generator step moves only the student and the discriminator step only the heads, the frozen backbone never changes,
and both entry scripts train every objective end to end."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lcm.adversarial import frozen
from lcm.consistency import LCDBatch, lcd_loss
from lcm.discriminator import build_heads, make_discriminator, teacher_features
from lcm.objectives import (ADDSpec, AdversarialSpec, StudentTimesteps, add_loss, discriminator_loss,
                            lcd_adv_loss, with_adversarial_term)
from lcm.roles import base_role, denoiser_role
from lcm.tiny import make_captioned_image_folder

from _helpers import lcd_unet_batch, load_entry_script


@pytest.fixture
def setup():
    unet, batch, spec = lcd_unet_batch([3, 40])
    heads = build_heads(unet, hidden=8)
    return unet, heads, batch, spec


def _gens(seed=7, n=2):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _lora(unet):
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def _base(unet):
    return {n: p for n, p in unet.named_parameters() if "lora_" not in n}


def test_lcd_adv_at_weight_zero_is_lcd_loss_and_gradient(setup):
    unet, heads, batch, spec = setup
    student, teacher = denoiser_role(unet), base_role(unet)
    d = make_discriminator(teacher_features(unet), heads)
    plain, _ = lcd_loss(student, student, teacher, batch, spec)
    plain.mean().backward()
    g_plain = {n: p.grad.clone() for n, p in _lora(unet).items()}
    unet.zero_grad(set_to_none=True)
    with frozen(heads):
        adv, diag, _ = lcd_adv_loss(student, student, teacher, d, batch, spec, AdversarialSpec(), 0.0, _gens())
    adv.mean().backward()
    assert torch.equal(plain, adv)
    assert all(torch.equal(g_plain[n], p.grad) for n, p in _lora(unet).items())
    assert float(diag["g_adv"]) != 0  # the term was computed, only not added
    # and a positive weight does change the loss
    with frozen(heads):
        weighted, _, _ = lcd_adv_loss(student, student, teacher, d, batch, spec, AdversarialSpec(), 0.5, _gens())
    assert not torch.equal(plain, weighted)


def test_student_t_max_keeps_the_term_off_the_rows_above_it(setup):
    """adversarial.student_t_max: rows with t_{n+k} above it get the plain LCD loss (and D still sees them), rows at
    or below it get exactly the full term's loss. The fixture's rows sit at t_{n+k} = 79 and 819."""
    unet, heads, batch, spec = setup
    student, teacher = denoiser_role(unet), base_role(unet)
    d = make_discriminator(teacher_features(unet), heads)
    assert spec.grid.pair(batch.index)[0].tolist() == [79, 819]
    with torch.no_grad(), frozen(heads):
        plain, _ = lcd_loss(student, student, teacher, batch, spec)
        full, _, _ = lcd_adv_loss(student, student, teacher, d, batch, spec, AdversarialSpec(), 0.5, _gens())
        low, _, handoff = lcd_adv_loss(student, student, teacher, d, batch, spec, AdversarialSpec(student_t_max=500),
                                       0.5, _gens())
        none, _, _ = lcd_adv_loss(student, student, teacher, d, batch, spec, AdversarialSpec(student_t_max=78), 0.5,
                                  _gens())
    assert not torch.equal(full, plain)
    assert torch.equal(low[0], full[0]) and torch.equal(low[1], plain[1])
    assert torch.equal(none, plain)
    assert handoff["fake"].shape[0] == 2  # the discriminator's batch is every row's clean estimate


@pytest.mark.parametrize("objective", ["add", "lightning"])
def test_student_t_max_is_refused_where_it_does_not_apply(tiny_sdxl_dir, data, tmp_path, objective):
    with pytest.raises(ValueError, match="adversarial.student_t_max"):
        load_entry_script("train_lcm_lora").main(_args(tiny_sdxl_dir, data, tmp_path / "run", "lora.rank=4",
                                                       "lora.alpha=4", f"distill.objective={objective}",
                                                       "distill.stages=[2,1]", "adversarial.student_t_max=500"))


def test_student_t_max_trains_where_it_applies(tiny_sdxl_dir, data, tmp_path):
    """The *_adv objectives take adversarial.student_t_max (a refusal meant for add / lightning once caught them too)."""
    out = tmp_path / "run"
    load_entry_script("train_lcm_lora").main(_args(tiny_sdxl_dir, data, out, "lora.rank=4", "lora.alpha=4",
                                                   "distill.objective=lcd_adv", "adversarial.student_t_max=500"))
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("base", ["pcm", "tcd"])
def test_pcm_and_tcd_adv_at_weight_zero_are_the_plain_loss_and_judge_the_clean_estimate(setup, base):
    """pcm_adv / tcd_adv = pcm / tcd + the term on the student's clean estimate. At weight 0 loss and gradients are the
    plain objective's, bit for bit; the judged sample is f_θ(z_{t_{n+k}}, t_{n+k} → clean end), i.e. LCD's
    consistency output from the same network call, not the trajectory point at s (which is still noisy); a positive
    weight changes the loss."""
    from lcm.consistency import predict_consistency
    from lcm.trajectory import pcm_loss, pcm_terms, tcd_loss, tcd_terms

    unet, heads, batch, spec = setup
    student, teacher = denoiser_role(unet), base_role(unet)
    d = make_discriminator(teacher_features(unet), heads)
    plain_fn = {"pcm": lambda g: pcm_loss(student, student, teacher, batch, spec, 2),
                "tcd": lambda g: tcd_loss(student, student, teacher, batch, spec, g)}[base]
    terms_fn = {"pcm": lambda g: pcm_terms(student, student, teacher, batch, spec, 2),
                "tcd": lambda g: tcd_terms(student, student, teacher, batch, spec, g)}[base]
    plain, _ = plain_fn(_gens())
    plain.mean().backward()
    g_plain = {n: p.grad.clone() for n, p in _lora(unet).items()}
    unet.zero_grad(set_to_none=True)
    gens = _gens()
    with frozen(heads):
        adv, diag, handoff = with_adversarial_term(terms_fn(gens), d, batch, spec, AdversarialSpec(), 0.0, gens)
    adv.mean().backward()
    assert torch.equal(plain, adv)
    assert all(torch.equal(g_plain[n], p.grad) for n, p in _lora(unet).items())
    assert float(diag["g_adv"]) != 0
    unet.zero_grad(set_to_none=True)
    t_nk, _ = spec.grid.pair(batch.index)
    with torch.no_grad():
        clean = predict_consistency(student, spec.schedule.add_noise(batch.z0, batch.noise, t_nk), t_nk, batch.cond,
                                    batch.w, spec)
    torch.testing.assert_close(handoff["fake"], clean.float(), rtol=0, atol=1e-6)
    assert torch.equal(handoff["real"], batch.z0)
    gens = _gens()
    with frozen(heads):
        weighted, _, _ = with_adversarial_term(terms_fn(gens), d, batch, spec, AdversarialSpec(), 0.5, gens)
    assert not torch.equal(plain, weighted)


def test_judge_end_is_judge_clean_for_lcd(setup):
    """For LCD every row's end is the clean one: adversarial.judge=end gives the same loss and handoff as clean."""
    unet, heads, batch, spec = setup
    student, teacher = denoiser_role(unet), base_role(unet)
    d = make_discriminator(teacher_features(unet), heads)
    with torch.no_grad(), frozen(heads):
        clean = lcd_adv_loss(student, student, teacher, d, batch, spec, AdversarialSpec(), 0.5, _gens())
        end = lcd_adv_loss(student, student, teacher, d, batch, spec, AdversarialSpec(judge="end"), 0.5, _gens())
    assert torch.equal(clean[0], end[0]) and torch.equal(clean[2]["fake"], end[2]["fake"])
    assert "end" not in end[2]


def test_pcm_judge_end_judges_the_phase_edge_output(setup):
    """pcm_adv with adversarial.judge=end judges f_θ(z_{t_{n+k}} → s_m), the phase-edge sample the sampler takes: the
    handoff carries it and its edge; at weight 0 the loss is plain PCM's; the lowest-phase row (t_{n+k} = 79, clean
    end) gets exactly the clean judge's term, the upper one (819 → edge 499) another; D judges both at t̂ ≥ s."""
    from lcm.consistency import predict_trajectory
    from lcm.trajectory import pcm_end, pcm_loss, pcm_terms

    unet, heads, batch, spec = setup
    student, teacher = denoiser_role(unet), base_role(unet)
    d = make_discriminator(teacher_features(unet), heads)
    t_nk, t_n = spec.grid.pair(batch.index)
    edges = pcm_end(spec.grid, 2)(t_nk, t_n)
    assert edges.tolist() == [-1, 499]
    with torch.no_grad(), frozen(heads):
        plain, _ = pcm_loss(student, student, teacher, batch, spec, 2)
        gens = _gens()
        zero, _, handoff = with_adversarial_term(pcm_terms(student, student, teacher, batch, spec, 2), d, batch, spec,
                                                 AdversarialSpec(judge="end"), 0.0, gens)
        gens = _gens()
        end_loss, _, _ = with_adversarial_term(pcm_terms(student, student, teacher, batch, spec, 2), d, batch, spec,
                                               AdversarialSpec(judge="end"), 1.0, gens)
        gens = _gens()
        clean_loss, _, _ = with_adversarial_term(pcm_terms(student, student, teacher, batch, spec, 2), d, batch, spec,
                                                 AdversarialSpec(), 1.0, gens)
        at_edge = predict_trajectory(student, spec.schedule.add_noise(batch.z0, batch.noise, t_nk), t_nk, edges,
                                     batch.cond, batch.w, spec)
    assert torch.equal(zero, plain)
    torch.testing.assert_close(handoff["fake"], at_edge.float(), rtol=0, atol=1e-6)
    assert torch.equal(handoff["end"], edges) and torch.equal(handoff["real"], batch.z0)
    assert end_loss[0] == clean_loss[0] and end_loss[1] != clean_loss[1]
    seen = []

    def recording(z, t_hat, cond):
        seen.append(t_hat.clone())
        return d(z, t_hat, cond)

    discriminator_loss(recording, handoff, [torch.Generator().manual_seed(s) for s in range(2)], spec.schedule,
                       AdversarialSpec(judge="end"))
    assert len(seen) == 2 and all(bool((t >= edges.clamp(min=0)).all()) for t in seen)
    # many rows at a high edge: every t̂ D sees, real or fake, lies at or above it
    seen.clear()
    many = {"real": torch.randn(32, 4, 2, 2), "fake": torch.randn(32, 4, 2, 2), "cond": {},
            "end": torch.full((32,), 900)}
    discriminator_loss(lambda z, t_hat, cond: seen.append(t_hat) or z.flatten(1).mean(1, keepdim=True), many,
                       [torch.Generator().manual_seed(s) for s in range(32)], spec.schedule,
                       AdversarialSpec(judge="end"))
    assert len(seen) == 2 and all(bool((t >= 900).all()) for t in seen)


@pytest.mark.parametrize("objective,ok", [("pcm_adv", True), ("tcd_adv", True), ("pcm", False), ("add", False)])
def test_judge_end_is_taken_by_the_adv_variants_only(objective, ok):
    from lcm.config import ConfigError, load_config

    overrides = [f"distill.objective={objective}", "adversarial.judge=end", "distill.num_ddim_timesteps=20",
                 "distill.phases=2"]
    if ok:
        assert load_config("mini_pcm_lora", overrides).adversarial.judge == "end"
    else:
        with pytest.raises(ConfigError, match="adversarial.judge"):
            load_config("mini_pcm_lora", overrides)
    with pytest.raises(ConfigError, match="adversarial.judge"):
        load_config("mini_pcm_lora", ["distill.objective=pcm_adv", "adversarial.judge=edge"])


def test_pcm_adv_judge_end_trains(tiny_sdxl_dir, data, tmp_path):
    out = tmp_path / "run"
    load_entry_script("train_lcm_lora").main(_args(tiny_sdxl_dir, data, out, "lora.rank=4", "lora.alpha=4",
                                                   "distill.objective=pcm_adv", "distill.phases=2",
                                                   "adversarial.judge=end"))
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("objective", ["lcd_adv", "add"])
def test_generator_step_moves_only_the_student_and_d_step_only_the_heads(setup, objective):
    unet, heads, batch, spec = setup
    student, teacher = denoiser_role(unet), base_role(unet)
    d = make_discriminator(teacher_features(unet), heads)
    adv = AdversarialSpec(r1_gamma=1.0)
    base_before = {n: p.detach().clone() for n, p in _base(unet).items()}
    # generator step: D frozen, judged through
    with frozen(heads):
        if objective == "lcd_adv":
            loss, _, handoff = lcd_adv_loss(student, student, teacher, d, batch, spec, adv, 1.0, _gens())
        else:
            add = ADDSpec(StudentTimesteps([999, 749, 499, 249]))
            add_batch = LCDBatch(batch.z0, batch.noise, torch.tensor([0, 2]), batch.w, batch.cond, batch.uncond)
            loss, _, handoff = add_loss(student, teacher, d, add_batch, spec, add, adv, 1.0, _gens())
    loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _lora(unet).values())
    assert all(p.grad is None for p in heads.parameters()) and all(p.requires_grad for p in heads.parameters())
    assert all(p.grad is None for p in _base(unet).values())
    unet.zero_grad(set_to_none=True)
    # discriminator step on the handoff: only the heads get gradients and move
    heads_before = {n: p.detach().clone() for n, p in heads.named_parameters()}
    lora_before = {n: p.detach().clone() for n, p in _lora(unet).items()}
    d_loss, diag = discriminator_loss(d, handoff, _gens(11), spec.schedule, adv)
    d_loss.mean().backward()
    torch.optim.SGD(heads.parameters(), lr=0.1).step()
    assert all(p.grad is None for p in unet.parameters())
    assert any(not torch.equal(heads_before[n], p) for n, p in heads.named_parameters())
    assert all(torch.equal(lora_before[n], p) for n, p in _lora(unet).items())
    assert all(torch.equal(base_before[n], p) for n, p in _base(unet).items())
    assert {"d_loss", "d_acc_real", "d_acc_fake", "r1"} <= set(diag) and float(diag["r1"]) > 0


def _args(teacher, data, out, *extra, config="demo_lcm_lora"):
    return ["--config", config, f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={out}",
            "data.resolution=16", "train.batch_size=2", "train.report_to=none", "validation.every_n_steps=0",
            "train.max_train_steps=2", "train.checkpoint_every=2", "train.seed=5", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_captioned_image_folder(tmp_path_factory.mktemp("objectives") / "data", n=4, size=24)


def test_lcd_adv_weight_zero_trains_the_same_lora_as_lcd(tiny_sdxl_dir, data, tmp_path):
    train = load_entry_script("train_lcm_lora")
    lora = ("lora.rank=4", "lora.alpha=4")
    assert train.main(_args(tiny_sdxl_dir, data, tmp_path / "lcd", *lora)) == 0
    assert train.main(_args(tiny_sdxl_dir, data, tmp_path / "adv0", *lora, "distill.objective=lcd_adv",
                            "adversarial.weight=0.0", "adversarial.r1_gamma=0.1")) == 0
    a = load_file(tmp_path / "lcd/final/pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "adv0/final/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the adversarial run checkpointed its discriminator and its optimiser beside the adapters
    ckpt = tmp_path / "adv0/checkpoints/step-000002"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer_1.bin").is_file()
    assert not (tmp_path / "lcd/checkpoints/step-000002/optimizer_1.bin").exists()


@pytest.mark.parametrize("base", ["pcm", "tcd"])
def test_pcm_and_tcd_adv_weight_zero_train_the_same_lora_and_export_like_their_base(tiny_sdxl_dir, data, tmp_path,
                                                                                   base):
    train = load_entry_script("train_lcm_lora")
    lora = ("lora.rank=4", "lora.alpha=4", "distill.num_ddim_timesteps=50", "distill.phases=2")
    assert train.main(_args(tiny_sdxl_dir, data, tmp_path / base, *lora, f"distill.objective={base}")) == 0
    assert train.main(_args(tiny_sdxl_dir, data, tmp_path / "adv0", *lora, f"distill.objective={base}_adv",
                            "adversarial.weight=0.0", "adversarial.head_hidden=8")) == 0
    a = load_file(tmp_path / base / "final/pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "adv0/final/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "adv0/checkpoints/step-000002/optimizer_1.bin").is_file()  # the discriminator's optimiser
    # the same sampler is exported, and the card names the adversarial objective
    sched = "final/scheduler/scheduler_config.json"
    assert (tmp_path / base / sched).read_text() == (tmp_path / "adv0" / sched).read_text()
    card = (tmp_path / "adv0/final/README.md").read_text()
    assert f"{base}_adv" in card and "discriminator heads" in card
    assert ("TCD-LoRA" if base == "tcd" else "PCM-LoRA") in card


@pytest.mark.parametrize("script,objective,backbone", [("train_lcm_lora", "add", "frozen"),
                                                     ("train_lcm_lora", "lcd_adv", "trainable"),
                                                     ("train_lcd", "lcd_adv", "frozen"), ("train_lcd", "add", "frozen")])
def test_entry_scripts_train_adversarial_objectives(tiny_sdxl_dir, data, tmp_path, script, objective, backbone):
    extra = ("lora.rank=4", "lora.alpha=4") if script == "train_lcm_lora" else ("distill.w_embed_dim=8",)
    config = "demo_lcm_lora" if script == "train_lcm_lora" else "lcd_sdxl"
    out = tmp_path / "run"
    assert load_entry_script(script).main(_args(tiny_sdxl_dir, data, out, *extra, f"distill.objective={objective}",
                                                "adversarial.weight=0.5", "adversarial.head_hidden=8",
                                                f"adversarial.backbone={backbone}", config=config)) == 0
    heads = load_file(out / "checkpoints/step-000002" / ("model.safetensors" if script == "train_lcm_lora"
                                                         else "model_1.safetensors"))
    if backbone == "trainable":  # the critic's checkpoint holds its encoder copy beside the heads
        assert any(k.startswith("heads.heads.") for k in heads) and any(k.startswith("encoder.down_blocks.") for k in heads)
        assert not any("up_blocks" in k or "lora_" in k for k in heads)
    else:
        assert any(k.startswith("heads.") for k in heads)
    assert (out / "final").is_dir()
    # The discriminator's scalars reach metrics.jsonl without a tracker (the benchmarks' report_to=none)
    (last,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = [k for k in last if k.endswith("d_acc_real") or k.endswith("d_acc_fake")]
    assert last["step"] == 2 and len(accuracy) == 2 and all(0 <= last[k] <= 1 for k in accuracy), last
    if script == "train_lcd" and objective == "add":  # the whole-UNet ADD row of `lcm eval` samples as trained
        from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

        from lcm.evaluate import ROW_KINDS, RowSetup

        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        with ROW_KINDS["lcd"](RowSetup(pipe, pipe.scheduler.config, [1], [], 1.5, 1.0, 50), "ADD", str(out)):
            assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
            assert pipe.unet.config.time_cond_proj_dim == 8


def test_add_run_samples_bit_for_bit_with_lcm_sample_preset_turbo(tiny_sdxl_dir, data, tmp_path):
    """The ADD trainer validates with the `turbo` preset's scheduler and exports it: its 4-step validation grid and
    `lcm sample --preset turbo` on the exported LoRA are the same pixels; at 1 and 4 steps the exported scheduler
    has the trainer's timesteps, and at 4 those are exactly ADD's student timesteps."""
    import numpy as np
    from diffusers import EulerAncestralDiscreteScheduler
    from PIL import Image

    from lcm.cli import main as lcm_main
    from lcm.config import load_config
    from lcm.presets import build_scheduler
    from lcm.sampling import student_scheduler_for

    out = tmp_path / "add"
    prompts = ["a red circle", "a blue square"]
    # fused_forward off: validation then runs PEFT's own LoRA forward, the one a loaded pipeline runs
    assert load_entry_script("train_lcm_lora").main(_args(
        tiny_sdxl_dir, data, out, "lora.rank=4", "lora.alpha=4", "lora.fused_forward=false",
        "distill.objective=add", "adversarial.weight=0.5", "adversarial.head_hidden=8",
        "validation.every_n_steps=2", "validation.num_inference_steps=4", "validation.seeds=[0,1]",
        f"validation.prompts=[{','.join(prompts)}]")) == 0
    saved = EulerAncestralDiscreteScheduler.from_pretrained(str(out / "final"), subfolder="scheduler")
    assert saved.config.timestep_spacing == "trailing"
    cfg = load_config(str(out / "config.yaml"))
    ours = student_scheduler_for(cfg.distill, saved.config)
    for steps in (1, 4):
        cli = build_scheduler("turbo", saved.config)
        ours.set_timesteps(steps)
        cli.set_timesteps(steps)
        assert torch.equal(ours.timesteps, cli.timesteps)
    assert cli.timesteps.tolist() == list(cfg.adversarial.student_timesteps)  # 4 steps: 999, 749, 499, 249

    grid = tmp_path / "cli.png"
    args = ["sample", "--base", str(tiny_sdxl_dir), "--lora", str(out), "--preset", "turbo", "--steps", "4",
            "--seeds", "0,1", "--height", "16", "--width", "16", "--device", "cpu", "--dtype", "fp32", "--out", str(grid)]
    for p in prompts:
        args += ["--prompt", p]
    assert lcm_main(args) == 0
    trained = np.asarray(Image.open(out / "samples/step-000002.png"))
    sampled = np.asarray(Image.open(grid))
    assert trained.shape == sampled.shape and np.array_equal(trained, sampled)
    assert "ADD-LoRA" in (out / "final/README.md").read_text()
    # `lcm eval` scores the LoRA with the scheduler its run saved (not LCMScheduler)
    from diffusers import StableDiffusionXLPipeline

    from lcm.evaluate import ROW_KINDS, RowSetup

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    setup = RowSetup(pipe, pipe.scheduler.config, [1, 4], [], 1.5, 1.0, 50)
    with ROW_KINDS["lora"](setup, "ADD-LoRA", str(out)):
        assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
        assert pipe.scheduler.config.timestep_spacing == "trailing"


def test_add_with_terminal_pure_noise_feeds_the_turbo_start_at_999_only(setup):
    """distill.terminal_pure_noise=true in `add`: the student's input at s = 999 is σ_999·ε, the VP form of the
    Euler sampler's first input (init_noise_sigma · ε, scaled by 1/√(σ²+1)); at s < 999 it is the forward-diffused
    latent as before, so those rows' losses do not move."""
    import dataclasses

    unet, heads, batch, spec = setup
    student, teacher = denoiser_role(unet), base_role(unet)
    d = make_discriminator(teacher_features(unet), heads)
    add = ADDSpec(StudentTimesteps([999, 749, 499, 249]))
    add_batch = LCDBatch(batch.z0, batch.noise, torch.tensor([0, 2]), batch.w, batch.cond, batch.uncond)
    seen = []

    def spy(z, t, *args, **kwargs):
        seen.append(z.detach().clone())
        return student(z, t, *args, **kwargs)

    with torch.no_grad(), frozen(heads):
        plain, _, _ = add_loss(student, teacher, d, add_batch, spec, add, AdversarialSpec(), 1.0, _gens())
        pure, _, _ = add_loss(spy, teacher, d, add_batch, dataclasses.replace(spec, terminal_pure_noise=True), add,
                              AdversarialSpec(), 1.0, _gens())
    sigma_999 = spec.schedule.alpha_sigma(torch.tensor([999]))[1]
    torch.testing.assert_close(seen[0][0], (sigma_999 * batch.noise[0]).to(seen[0].dtype), rtol=0, atol=0)
    leaked = spec.schedule.add_noise(batch.z0, batch.noise, torch.tensor([999, 499]))
    assert not torch.allclose(seen[0][0], leaked[0])
    torch.testing.assert_close(seen[0][1], leaked[1], rtol=0, atol=0)
    assert torch.equal(pure[1], plain[1]) and not torch.equal(pure[0], plain[0])


@pytest.mark.parametrize("objective,ok", [("tcd", True), ("tcd_adv", True), ("lcd", False), ("pcm", False)])
def test_tcd_clean_share_is_taken_by_tcd_only(objective, ok):
    from lcm.config import ConfigError, load_config

    overrides = [f"distill.objective={objective}", "distill.tcd_clean_share=0.5", "distill.phases=5"]
    if ok:
        assert load_config("mini_tcd_lora", overrides).distill.tcd_clean_share == 0.5
    else:
        with pytest.raises(ConfigError, match="distill.tcd_clean_share"):
            load_config("mini_tcd_lora", overrides)
