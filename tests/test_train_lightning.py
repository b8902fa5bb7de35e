"""distill.objective=lightning on a tiny SDXL teacher: the generator step moves only the student and the D step only
the pair heads (the frozen encoder never changes), the conditional D reads x_t and the relaxed one does not, both
entry scripts train it, and a run's validation grid is exactly `lcm sample --preset lightning` (2 steps) or
`lightning-1step` (x₀ prediction) on the exported LoRA."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lcm.adversarial import frozen
from lcm.discriminator import build_pair_heads, make_pair_discriminator, teacher_features
from lcm.lightning import lightning_discriminator_loss, lightning_loss, make_stage
from lcm.roles import base_role, denoiser_role
from lcm.tiny import make_captioned_image_folder

from _helpers import lcd_unet_batch, load_entry_script, sample_cli

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture
def setup():
    unet, batch, spec = lcd_unet_batch([0, 3])
    return unet, batch, spec


def _split(unet):
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    base = {n: p for n, p in unet.named_parameters() if "lora_" not in n}
    return lora, base


def test_generator_step_moves_only_the_student_and_d_step_only_the_pair_heads(setup):
    unet, batch, spec = setup
    student, teacher = denoiser_role(unet), base_role(unet)
    heads = build_pair_heads(unet, hidden=8)
    d = make_pair_discriminator(teacher_features(unet), heads)
    stage = make_stage(0, [4, 2], 0, True, 4, "epsilon")  # 4 steps, adversarial from the start
    lora, base = _split(unet)
    base_before = {n: p.detach().clone() for n, p in base.items()}
    with frozen(heads):
        loss, diag, handoff = lightning_loss(student, teacher, d, batch, spec, stage, "hinge", 1.0)
    loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for p in heads.parameters()) and all(p.requires_grad for p in heads.parameters())
    assert all(p.grad is None for p in base.values())
    unet.zero_grad(set_to_none=True)
    heads_before = {n: p.detach().clone() for n, p in heads.named_parameters()}
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    d_loss, d_diag = lightning_discriminator_loss(d, handoff, "hinge", r1_gamma=1.0)
    d_loss.mean().backward()
    torch.optim.SGD(heads.parameters(), lr=0.1).step()
    assert all(p.grad is None for p in unet.parameters())
    assert any(not torch.equal(heads_before[n], p) for n, p in heads.named_parameters())
    assert all(torch.equal(lora_before[n], p) for n, p in lora.items())
    assert all(torch.equal(base_before[n], p) for n, p in base.items())
    assert {"d_loss", "d_acc_real", "d_acc_fake", "r1"} <= set(d_diag) and float(d_diag["r1"]) > 0
    assert "g_adv" in diag


def test_conditional_discriminator_reads_x_t_and_the_relaxed_one_does_not(setup):
    unet, batch, _ = setup
    x_end, x_start = batch.z0, batch.noise
    t_end, t_start = torch.tensor([499, -1]), torch.tensor([749, 249])
    for conditional in (True, False):
        heads = build_pair_heads(unet, hidden=8, conditional=conditional)
        d = make_pair_discriminator(teacher_features(unet), heads, conditional)
        with torch.no_grad():
            a = d(x_end, t_end, x_start, t_start, batch.cond)
            b = d(x_end, t_end, x_start + 1.0, t_start, batch.cond)
        assert a.shape == (2, len(heads.heads))
        assert (not torch.equal(a, b)) == conditional


def _args(teacher, data, out, *extra, config="demo_lcm_lora"):
    return ["--config", config, f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={out}",
            "data.resolution=16", "train.batch_size=2", "train.report_to=none", "validation.every_n_steps=0",
            "train.max_train_steps=2", "train.checkpoint_every=2", "train.seed=5", "distill.objective=lightning",
            "adversarial.head_hidden=8", "adversarial.weight=1.0", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_captioned_image_folder(tmp_path_factory.mktemp("lightning") / "data", n=4, size=24)


@pytest.mark.parametrize("script,backbone,conditional", [("train_lcm_lora", "trainable", "false"),
                                                         ("train_lcd", "frozen", "true")])
def test_entry_scripts_train_lightning(tiny_sdxl_dir, data, tmp_path, script, backbone, conditional):
    extra = ("lora.rank=4", "lora.alpha=4") if script == "train_lcm_lora" else ("distill.w_embed_dim=8",)
    config = "demo_lcm_lora" if script == "train_lcm_lora" else "lcd_sdxl"
    out = tmp_path / "run"
    assert load_entry_script(script).main(_args(
        tiny_sdxl_dir, data, out, *extra, "distill.stages=[4,2]", f"adversarial.backbone={backbone}",
        f"adversarial.conditional={conditional}", config=config)) == 0
    critic = load_file(out / "checkpoints/step-000002" / ("model.safetensors" if script == "train_lcm_lora"
                                                          else "model_1.safetensors"))
    if backbone == "trainable":
        assert any(k.startswith("heads.heads.") for k in critic) and any(k.startswith("encoder.") for k in critic)
    else:
        assert any(k.startswith("heads.") for k in critic)
    assert "Lightning" in (out / "final/README.md").read_text()


def _sample_cli(teacher, run, out, *extra):
    return sample_cli(teacher, run, out, PROMPTS, *extra)


@pytest.mark.parametrize("stages,steps,preset,prediction", [("[4,2]", 2, "lightning", "epsilon"),
                                                            ("[2,1]", 1, "lightning-1step", "sample")])
def test_lightning_run_samples_bit_for_bit_with_lcm_sample_preset(tiny_sdxl_dir, data, tmp_path, stages, steps,
                                                                  preset, prediction):
    """The run validates with the exported scheduler (Euler trailing; x₀ read as a sample after a 1-step stage), and
    `lcm sample --preset PRESET --steps n` on the LoRA draws the validation grid's pixels."""
    from diffusers import EulerDiscreteScheduler

    from lcm.lightning import stage_timesteps

    out = tmp_path / "lightning"
    assert load_entry_script("train_lcm_lora").main(_args(
        tiny_sdxl_dir, data, out, "lora.rank=4", "lora.alpha=4", "lora.fused_forward=false",
        f"distill.stages={stages}", "validation.every_n_steps=2", f"validation.num_inference_steps={steps}",
        "validation.seeds=[0,1]", f"validation.prompts=[{','.join(PROMPTS)}]")) == 0
    saved = EulerDiscreteScheduler.from_pretrained(str(out / "final"), subfolder="scheduler")
    assert saved.config.timestep_spacing == "trailing" and saved.config.prediction_type == prediction
    saved.set_timesteps(steps)
    assert saved.timesteps.long().tolist() == stage_timesteps(steps).tolist()
    sampled = _sample_cli(tiny_sdxl_dir, out, tmp_path / "cli.png", "--preset", preset, "--steps", str(steps))
    trained = np.asarray(Image.open(out / "samples/step-000002.png"))
    assert trained.shape == sampled.shape and np.array_equal(trained, sampled)
    card = (out / "final/README.md").read_text()
    assert "Lightning-LoRA" in card and f"num_inference_steps={steps}" in card and f"--preset {preset}" in card


def test_stage_lr_restart_gives_each_stage_its_own_schedule(tiny_sdxl_dir, data, tmp_path):
    """With distill.stage_lr_restart the logged LR of stage 2 repeats stage 1's (each its own cosine with warm-up over
    its own steps, diffusers' schedule); without it one cosine runs over both stages."""
    import json

    from diffusers.optimization import get_scheduler

    def logged(out, *extra):
        assert load_entry_script("train_lcm_lora").main(_args(
            tiny_sdxl_dir, data, out, "lora.rank=4", "lora.alpha=4", "distill.stages=[4,2]", "train.max_train_steps=4",
            "train.checkpoint_every=4", "train.log_every=1", "optim.lr_scheduler=cosine", "optim.lr_warmup_steps=1",
            "optim.lr=0.01", *extra)) == 0
        return [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    def alone(steps):  # the LR logged after each of `steps` optimiser steps of a run of that length
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
        sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=1, num_training_steps=steps)
        out = []
        for _ in range(steps):
            opt.step()
            sched.step()
            out.append(sched.get_last_lr()[0])
        return out

    restarted = logged(tmp_path / "restart", "distill.stage_lr_restart=true")
    assert restarted == pytest.approx(alone(2) + alone(2))
    assert logged(tmp_path / "one", "distill.stage_lr_restart=false") == pytest.approx(alone(4))
    assert alone(4) != pytest.approx(alone(2) + alone(2))


def test_lightning_config_errors_name_the_key(tiny_sdxl_dir, data, tmp_path):
    from lcm.config import ConfigError

    train = load_entry_script("train_lcm_lora")
    with pytest.raises(ConfigError, match="distill.stages"):
        train.main(_args(tiny_sdxl_dir, data, tmp_path / "a", "distill.stages=[2,4]"))
    with pytest.raises(ConfigError, match="distill.stage_lr_restart"):
        train.main(_args(tiny_sdxl_dir, data, tmp_path / "c", "distill.objective=lcd", "distill.stage_lr_restart=true"))
    with pytest.raises(ConfigError, match="validation.num_inference_steps"):
        train.main(_args(tiny_sdxl_dir, data, tmp_path / "b", "distill.stages=[2,1]", "validation.every_n_steps=1",
                         "validation.num_inference_steps=4"))
