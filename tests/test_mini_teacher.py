"""The shipped mini teacher and digit classifier, the digits data path, and the Fréchet distance.

No network: the teacher loads from the repo's own `lcm/assets/mini_teacher` with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub read it

import pytest
import torch

from lcm.classifier import CLASSIFIER_PATH, classify, digit_features, frechet_distance, load_classifier
from lcm.digits import NUMBER_WORDS, eval_prompts, export_digits_folder, load_digits_tensors, split_indices
from lcm.guidance import guidance_scale_from_w

pytest.importorskip("sklearn")  # the digits ship inside scikit-learn (a dev extra)

TEACHER_DIR = CLASSIFIER_PATH.parent / "mini_teacher"
# Measured on 500 samples at 25 DDIM steps (scripts/train_mini_teacher.py docstring): W_BEST gives ~ACC_MEASURED.
# The 20-image check below uses a bar well under that, so seed-level noise cannot fail it, while a broken loader,
# scheduler (e.g. clip_sample=True) or guidance convention lands near chance (10 %).
W_BEST = 1.5  # 99 % on 500 samples; w = 0.5 has the best Fréchet distance (96 %)
MIN_ACCURACY_20 = 0.7


@pytest.fixture(scope="module")
def teacher():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(TEACHER_DIR, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_teacher_scheduler_is_sdxl_without_clipping(teacher):
    cfg = teacher.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == (
        "scaled_linear", 0.00085, 0.012, 1000,
    )  # fmt: skip
    assert cfg.clip_sample is False  # True would clip latents to [-1, 1]
    assert cfg.timestep_spacing == "trailing"
    assert teacher.config.force_zeros_for_empty_prompt
    assert teacher.unet.config.addition_embed_type == "text_time"


def test_plain_from_pretrained_gives_a_float32_pipeline():
    # Weights are partly stored in fp16 (size budget); a plain load must still give a CPU-runnable fp32 pipeline.
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(TEACHER_DIR)
    dtypes = {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)}
    assert dtypes == {torch.float32}


def test_teacher_draws_the_prompted_digit(teacher):
    from diffusers import DDIMScheduler

    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    prompts, labels = eval_prompts(20)  # 2 per digit, different caption templates
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(20)]
    out = teacher(prompt=prompts, num_inference_steps=25, guidance_scale=guidance_scale_from_w(W_BEST),
                  generator=generators, output_type="pt").images  # fmt: skip
    assert out.shape == (20, 3, 16, 16) and torch.isfinite(out).all()
    accuracy = (classify(out * 2 - 1) == torch.tensor(labels)).float().mean().item()
    assert accuracy >= MIN_ACCURACY_20, accuracy


def test_classifier_recognises_held_out_digits():
    x, y = load_digits_tensors("held_out")
    model = load_classifier()
    assert (classify(x, model) == y).float().mean().item() >= 0.9
    assert digit_features(x[:5], model).shape == (5, model.feature_dim)


def test_split_is_deterministic_disjoint_and_complete():
    from sklearn.datasets import load_digits

    labels = torch.from_numpy(load_digits().target)
    train, held = split_indices(labels, "train"), split_indices(labels, "held_out")
    assert torch.equal(train, split_indices(labels, "train"))
    assert not set(train.tolist()) & set(held.tolist())
    assert len(train) + len(held) == len(labels)
    assert len(labels[held].unique()) == 10  # stratified: every digit is held out


def test_export_digits_folder(tmp_path):
    from PIL import Image

    out = export_digits_folder(tmp_path / "digits", size=16, split="held_out")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    pngs = sorted(p.name for p in out.glob("*.png"))
    _, labels = load_digits_tensors("held_out")
    assert len(rows) == len(pngs) == len(labels)
    assert sorted(r["file_name"] for r in rows) == pngs
    for row, label in zip(rows, labels.tolist()):
        assert row["file_name"].endswith(f"_{label}.png")
        words = row["text"].replace(",", " ").split()
        assert NUMBER_WORDS[label] in words or str(label) in words, row
    image = Image.open(out / pngs[0])
    assert image.size == (16, 16) and image.mode == "RGB"


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-6


def test_frechet_distance_of_shifted_and_scaled_gaussians_is_analytic():
    # b = s·a + δ has μ_b = s·μ_a + δ and Σ_b = s²Σ_a, so FD = ‖(s−1)μ_a + δ‖² + (1 − s)² tr Σ_a, exactly (with the
    # sample statistics), because Σ_a^½ Σ_b Σ_a^½ = s²Σ_a² has square root s·Σ_a.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    delta = torch.randn(6, generator=g, dtype=torch.float64)
    for s in (1.0, 0.5, 2.0):
        b = s * a + delta
        expected = ((s - 1) * a.mean(0) + delta).square().sum() + (1 - s) ** 2 * torch.cov(a.T).trace()
        assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-6, abs=1e-8)
