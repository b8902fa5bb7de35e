"""Full LCD: zero-initialised guidance embedding, EMA target timing, smoke runs that export and reload in diffusers."""

from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from lcm.consistency import guided_denoiser
from lcm.guidance import guidance_scale_from_w, w_embedding
from lcm.ema import EMATarget
from lcm.models import noise_schedule_of, student_from_teacher
from lcm.roles import denoiser_role
from lcm.tiny import make_captioned_image_folder, save_tiny_pipeline
from lcm.trainer import TrainingTask, make_accelerator, train
from lcm.cli import main as lcm_main
from lcm.config import load_config

from _helpers import load_entry_script

ROOT = Path(__file__).resolve().parents[1]


def _train_lcd():
    return load_entry_script("train_lcd").main

def _sdxl_cond(unet, B=3):
    c = unet.config
    text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return {"encoder_hidden_states": torch.randn(B, 77, c.cross_attention_dim),
            "text_embeds": torch.randn(B, text_dim), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * B)}


def test_zero_initialised_w_embedding_starts_equal_to_teacher(tiny_sdxl_dir):
    teacher = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    student = student_from_teacher(teacher, 32)
    assert student.config.time_cond_proj_dim == 32
    z, t, cond = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 19]), _sdxl_cond(teacher)
    with torch.no_grad():
        expected = denoiser_role(teacher)(z, t, cond)
        for w in (0.0, 3.0, 15.0):
            torch.testing.assert_close(denoiser_role(student)(z, t, cond, torch.full((3,), w)), expected)
        # …and the embedding is live: a non-zero projection makes w matter.
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.1)
        assert (denoiser_role(student)(z, t, cond, torch.full((3,), 5.0)) - expected).abs().max() > 1e-4


def test_ema_target_moves_only_on_optimiser_steps_by_the_right_amount(tmp_path):
    """4 micro-batches with accumulation 2 = 2 optimiser steps = 2 EMA updates, each θ⁻ ← μθ⁻ + (1 − μ)θ."""
    cfg = load_config(None, ["model.pretrained=x", "data.path=y", f"train.output_dir={tmp_path}", "train.batch_size=1",
                             "train.gradient_accumulation_steps=2", "train.max_train_steps=2", "train.report_to=none",
                             "train.checkpoint_every=0", "validation.every_n_steps=0", "optim.lr=0.1",
                             "optim.lr_warmup_steps=0"])
    model = torch.nn.Linear(3, 1)
    ema = EMATarget(dict(model.named_parameters()), decay=0.75)
    history = []

    def after_step():
        before = [s.clone() for s in ema.shadow]
        ema.update()
        for b, s, p in zip(before, ema.shadow, ema.params):
            torch.testing.assert_close(s, 0.75 * b + 0.25 * p.detach())
        history.append([p.detach().clone() for p in model.parameters()])

    data = [{"x": torch.randn(3), "y": torch.randn(1)} for _ in range(4)]

    def loss_fn(m, batch, gen):
        return (m(batch["x"]) - batch["y"]).pow(2).mean(1), {}

    task = TrainingTask(model=model, params=list(model.parameters()), dataset=data,
                        collate_fn=lambda items: {k: torch.stack([i[k] for i in items]) for k in items[0]},
                        loss_fn=loss_fn, after_optimizer_step=after_step)
    train(cfg, make_accelerator(cfg.train), task)
    assert len(history) == 2


@pytest.mark.parametrize("kind, prediction_type", [("sdxl", "epsilon"), ("sd15", "epsilon"), ("sd15", "v_prediction")])
def test_train_lcd_exports_and_samples_in_stock_pipeline(kind, prediction_type, tmp_path):
    teacher = save_tiny_pipeline(kind, tmp_path / "teacher", prediction_type=prediction_type)
    data = make_captioned_image_folder(tmp_path / "data", n=4, size=16)
    out = tmp_path / "run"
    assert _train_lcd()(["--config", "lcd_sdxl", f"model.kind={kind}", f"model.pretrained={teacher}",
                         f"data.path={data}", f"train.output_dir={out}", "data.resolution=16", "train.batch_size=2",
                         "train.gradient_accumulation_steps=1", "train.max_train_steps=2", "train.mixed_precision=no",
                         "train.gradient_checkpointing=false", "train.report_to=none", "train.checkpoint_every=0",
                         "validation.every_n_steps=0", "distill.w_embed_dim=32", "optim.lr=1e-3"]) == 0
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    unet = UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet")
    scheduler = LCMScheduler.from_pretrained(out / "final", subfolder="scheduler")
    assert scheduler.config.prediction_type == prediction_type
    pipe = cls.from_pretrained(teacher, unet=unet, scheduler=scheduler, **extra)
    pipe.set_progress_bar_config(disable=True)

    # The stock pipeline embeds guidance_scale − 1; with guidance_scale = w + 1 that is the w used in training.
    seen = {}
    def capture(module, args, kwargs):
        seen.setdefault("cond", kwargs["timestep_cond"])

    unet.register_forward_pre_hook(capture, with_kwargs=True)
    w = 4.0
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=guidance_scale_from_w(w), height=16, width=16,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (16, 16, 3) and 0 <= image.min() and image.max() <= 1
    torch.testing.assert_close(seen["cond"][0], w_embedding(torch.tensor([w]), 32)[0])
    assert lcm_main(["sample", "--base", str(teacher), "--student", str(out), "--prompt", "a red circle", "--seeds", "0",
                     "--steps", "2", "--guidance", str(guidance_scale_from_w(w)), "--height", "16", "--width", "16",
                     "--device", "cpu", "--out", str(tmp_path / "s.png")]) == 0


def test_v_prediction_teacher_yields_consistent_x0_and_eps(tmp_path):
    """z = α x̂₀ + σ ε̂ must hold for the guided teacher's outputs whatever the prediction type."""
    path = save_tiny_pipeline("sd15", tmp_path / "v", prediction_type="v_prediction")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    schedule = noise_schedule_of(pipe.scheduler)
    role = denoiser_role(pipe.unet)
    cond = {"encoder_hidden_states": torch.randn(2, 77, pipe.unet.config.cross_attention_dim)}
    uncond = {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 300])
    with torch.no_grad():
        for w in (0.0, 2.5):
            x0, eps = guided_denoiser(role, cond, uncond, torch.full((2,), w), schedule, "v_prediction")(z, t)
            alpha, sigma = schedule.alpha_sigma(t, 4)
            torch.testing.assert_close(alpha * x0 + sigma * eps, z, atol=1e-4, rtol=1e-4)
        # Treating the v-model as ε-prediction would break that identity's partner: x̂₀ would differ.
        x0_wrong, _ = guided_denoiser(role, cond, uncond, torch.zeros(2), schedule, "epsilon")(z, t)
        x0_right, _ = guided_denoiser(role, cond, uncond, torch.zeros(2), schedule, "v_prediction")(z, t)
        assert (x0_wrong - x0_right).abs().max() > 1e-2


def _tiny_lcd_run(tmp_path, *overrides):
    """train_lcd.py on a tiny SDXL teacher and 4 images, fp32, no validation; returns the run folder."""
    teacher = save_tiny_pipeline("sdxl", tmp_path / "teacher")
    data = make_captioned_image_folder(tmp_path / "data", n=4, size=16)
    out = tmp_path / "run"
    assert _train_lcd()(["--config", "lcd_sdxl", f"model.pretrained={teacher}", f"data.path={data}",
                         f"train.output_dir={out}", "data.resolution=16", "train.batch_size=2",
                         "train.gradient_accumulation_steps=1", "train.mixed_precision=no",
                         "train.gradient_checkpointing=false", "train.report_to=none", "validation.every_n_steps=0",
                         *overrides]) == 0
    return out


def test_train_lcd_exports_the_ema_target_not_the_online_student(tmp_path):
    """final/unet is θ⁻ (`EMATarget.copy_to`): equal to the checkpointed EMA shadow, and different from the online
    weights θ saved beside it (with μ = 0.5 after two steps the two differ, so the check can fail)."""
    from safetensors.torch import load_file

    out = _tiny_lcd_run(tmp_path, "train.max_train_steps=2", "train.checkpoint_every=2", "distill.w_embed_dim=32",
                        "distill.ema_decay=0.5", "optim.lr=1e-3")
    ckpt = out / "checkpoints/step-000002"
    shadow = {k.removeprefix("ema."): v for k, v in load_file(ckpt / "extra_state.safetensors").items()}
    online = load_file(next(ckpt.glob("model*.safetensors")))
    exported = UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet").state_dict()
    assert set(shadow) <= set(exported)
    for name, t in shadow.items():
        assert torch.equal(exported[name], t), name
    assert any(not torch.equal(online[n], t) for n, t in shadow.items())


def test_normal_cfg_whole_unet_student_has_no_w_input(tmp_path):
    out = _tiny_lcd_run(tmp_path, "train.max_train_steps=1", "train.checkpoint_every=0", "distill.teacher_cfg=false",
                        "distill.w_min=0", "distill.w_max=0")
    unet = UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet")
    assert unet.config.time_cond_proj_dim is None
    assert "normal-cfg" in (out / "final/README.md").read_text().split("---")[1]


def test_train_lcd_in_bf16_on_cpu_trains_the_student(tmp_path):
    """bf16 on a CPU: the student and the separate teacher both get lcm/cpu_lowp.py's kernels (the teacher after the
    student is copied from it); two steps train, and the exported student has moved off the teacher."""
    teacher = save_tiny_pipeline("sdxl", tmp_path / "teacher")
    data = make_captioned_image_folder(tmp_path / "data", n=4, size=16)
    out = tmp_path / "run"
    assert _train_lcd()(["--config", "lcd_sdxl", f"model.pretrained={teacher}", f"data.path={data}",
                         f"train.output_dir={out}", "data.resolution=16", "train.batch_size=2",
                         "train.gradient_accumulation_steps=1", "train.max_train_steps=2", "train.mixed_precision=bf16",
                         "train.gradient_checkpointing=false", "train.report_to=none", "train.checkpoint_every=0",
                         "validation.every_n_steps=0", "distill.w_embed_dim=32", "optim.lr=1e-3"]) == 0
    student = UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    assert student.conv_in.weight.dtype == torch.float32
    moved = [n for n, p in base.named_parameters() if not torch.equal(p, dict(student.named_parameters())[n])]
    assert moved, "two bf16 steps left every weight where the teacher had it"
