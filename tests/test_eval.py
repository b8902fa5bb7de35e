"""`lcm data digits` round-trips through the image-folder loader; `lcm eval` on a tiny budget writes its outputs."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from lcm.cli import MINI_TEACHER, main as lcm_main
from lcm.config import LCM_LORA_TARGETS
from lcm.data import build_dataset
from lcm.digits import load_digits_tensors
from lcm.lora import add_lora, save_lora
from lcm.models import student_from_teacher

from _helpers import data_cfg


def test_digits_folder_round_trips_through_the_image_folder_loader(tmp_path):
    assert lcm_main(["data", "digits", "--out", str(tmp_path / "d"), "--split", "held_out"]) == 0
    cfg = data_cfg(tmp_path / "d", resolution=16)
    ds = build_dataset(cfg)
    images, labels = load_digits_tensors("held_out")
    assert len(ds) == len(images) and ds.summary.n_missing_caption == 0
    # Files are written in split order with the label in the name; pixels survive PNG to within one 8-bit step.
    for i in (0, 7, len(ds) - 1):
        item = ds[i]
        assert (item["pixel_values"] - images[i]).abs().max() <= 2 / 255 + 1e-6
        from lcm.digits import NUMBER_WORDS

        label = int(labels[i])
        assert NUMBER_WORDS[label] in item["caption"] or str(label) in item["caption"]


def test_lcm_eval_tiny_budget_writes_table_json_grids_and_plot(tmp_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(MINI_TEACHER)
    student = student_from_teacher(pipe.unet, 8)  # a full-LCD student as train_lcd.py exports it (final/unet)
    student.save_pretrained(tmp_path / "lcd" / "final" / "unet")
    params = add_lora(pipe.unet, 4, 4, LCM_LORA_TARGETS)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    save_lora(pipe.unet, tmp_path / "lora", StableDiffusionXLPipeline)
    out = tmp_path / "eval"
    assert lcm_main(["eval", "--lora", str(tmp_path / "lora"), "--lcd", str(tmp_path / "lcd"), "--out", str(out),
                     "--n", "10", "--steps", "1,2", "--methods", "DDIM,LCM-LoRA,LCD", "--teacher-w", "0.5"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["steps"]) for r in rows] == [("DDIM", 1), ("DDIM", 2), ("DDIM", 25),
                                                         ("LCM-LoRA", 1), ("LCM-LoRA", 2), ("LCD", 1), ("LCD", 2)]
    assert all(0 <= r["accuracy"] <= 1 and r["frechet"] >= 0 and r["sec_per_image"] > 0 for r in rows)
    assert all("diversity" in r for r in rows)  # n = 10: one sample per digit, no pairs (nan); see the test below
    # The LCD student is sampled at the teacher's w through its embedding: guidance_scale = w + 1.
    assert [r["guidance_scale"] for r in rows if r["method"] == "LCD"] == [1.5, 1.5]
    table = (out / "table.md").read_text()
    assert table.count("| LCM-LoRA |") == 2 and table.count("| LCD |") == 2
    assert len(list((out / "grids").glob("*.png"))) == 7 and (out / "plot.png").stat().st_size > 0


def test_lcm_eval_student_rows_need_their_weights(tmp_path):
    for method, flag in (("LCM-LoRA", "--lora"), ("LCD", "--lcd")):
        with pytest.raises(ValueError, match=flag):
            lcm_main(["eval", "--out", str(tmp_path), "--n", "2", "--steps", "1", "--methods", method])


def test_a_student_named_lcd_is_an_ordinary_student_row(tmp_path):
    """`--student LCD=RUN` (README's example) plans a row from that run; without it the LCD row still needs --lcd."""
    from lcm.evaluate import _row_plan

    StableDiffusionXLPipeline.from_pretrained(MINI_TEACHER).unet.save_pretrained(tmp_path / "run" / "final" / "unet")
    run = str(tmp_path / "run")
    assert _row_plan(["DDIM", "LCD"], {}, None, {"LCD": (run, None)}) == [("DDIM", "teacher", None),
                                                                          ("LCD", "lcd", (run, None))]
    with pytest.raises(ValueError, match="--lcd"):
        _row_plan(["LCD"], {}, None, {"other": (run, None)})


def test_lcd_row_rejects_a_unet_without_guidance_embedding(tmp_path):
    StableDiffusionXLPipeline.from_pretrained(MINI_TEACHER).unet.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="guidance embedding"):
        lcm_main(["eval", "--lcd", str(tmp_path / "plain"), "--out", str(tmp_path / "e"), "--n", "2", "--steps", "1",
                  "--methods", "LCD"])


def test_class_diversity_is_the_mean_within_class_pairwise_distance():
    from lcm.classifier import class_diversity

    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(9, 5, generator=g), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    brute = []
    for c in (0, 1, 2):
        f = feats[labels == c]
        brute.append(sum((f[i] - f[j]).norm() for i in range(len(f)) for j in range(len(f)) if i != j)
                     / (len(f) * (len(f) - 1)))
    assert abs(class_diversity(feats, labels) - float(torch.stack(brute).mean())) < 1e-6
    # a collapsed class (all samples equal) has diversity 0; scaling the features scales it
    assert class_diversity(torch.ones(4, 3), torch.zeros(4, dtype=torch.long)) == 0.0
    assert abs(class_diversity(3 * feats, labels) - 3 * class_diversity(feats, labels)) < 1e-6
    # a class with a single sample has no pairs and is left out
    assert abs(class_diversity(feats[:4], labels[:4]) - float(brute[0])) < 1e-6


def test_euler_ancestral_teacher_row_only_when_asked_and_seeded(tmp_path):
    """The stochastic teacher row is planned only by name (the default rows stay DDIM, DPM-Solver++, Euler); it draws
    fresh noise per step from each image's own generator, so it differs from Euler and repeats exactly."""
    from lcm.evaluate import DEFAULT_TEACHER_ROWS, _row_plan, evaluate

    assert "Euler ancestral" not in DEFAULT_TEACHER_ROWS
    assert _row_plan(["Euler ancestral"], {}, None) == [("Euler ancestral", "teacher", None)]
    common = dict(n=10, steps=[2], teacher_extra_steps=[], teacher_w=0.5)
    rows = evaluate(str(MINI_TEACHER), None, tmp_path / "a", methods=["Euler", "Euler ancestral"], **common)
    again = evaluate(str(MINI_TEACHER), None, tmp_path / "b", methods=["Euler ancestral"], **common)
    assert [r.method for r in rows] == ["Euler", "Euler ancestral"]
    assert rows[0].frechet != rows[1].frechet and again[0].frechet == rows[1].frechet
    assert rows[1].guidance_scale == 1.5
