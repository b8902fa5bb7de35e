"""benchmarks/quality_mini.py's bookkeeping, with training and scoring faked: a rerun skips the seeds its log holds,
and OUT.md / OUT.json keep every cell of the log, so a later cell never hides an earlier one's table."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import quality_mini as qm  # noqa: E402

STEPS = (1, 2, 4, 8)


def fake_scores(base: float) -> dict:
    s = {str(k): {"fd": base + k, "acc": 0.9, "div": 30.0} for k in (*STEPS, qm.DIVERSITY_REF_STEPS)}
    s["heldout"] = {str(k): {"fd": base + 10 * k, "acc": 0.9} for k in qm.HELDOUT_STEPS}
    return s


def test_every_logged_cell_stays_in_the_summary_files(tmp_path, monkeypatch):
    trained = []

    def train(config, overrides, seed, run_dir, threads, script="train_lcm_lora.py"):
        trained.append((config, tuple(overrides), seed))
        (run_dir / "final" / "scheduler").mkdir(parents=True, exist_ok=True)
        (run_dir / "final" / "scheduler" / "scheduler_config.json").write_text('{"original_inference_steps": 25}')
        return 10.0 + seed

    def score(lora_dir, out_dir, n, steps, methods=("LCM-LoRA",), original_inference_steps=50):
        if lora_dir is None:  # the teacher
            return fake_scores(100.0)
        name, seed = Path(lora_dir).name.rsplit("-s", 1)
        return fake_scores({"cell-a": 50.0, "cell-b": 70.0}[name] + int(seed))

    monkeypatch.setattr(qm, "train", train)
    monkeypatch.setattr(qm, "score", score)
    monkeypatch.setattr(qm, "commit", lambda: "abc1234")
    out = tmp_path / "res" / "q"
    common = ["--threads", "1", "--runs", str(tmp_path / "runs"), "--out", str(out), "--n", "20"]
    qm.main(["--seeds", "0-2", "--config", "mini_lcm_lora", "--name", "cell-a", *common, "lora.rank=8"])
    assert trained == [("mini_lcm_lora", ("lora.rank=8",), s) for s in range(3)]
    result = qm.main(["--seeds", "0", "--config", "mini_tcd_lora", "--name", "cell-b", *common])
    assert len(trained) == 4  # cell-a's seeds are not trained again

    md = out.with_suffix(".md").read_text()
    # this cell first, then cell-a with its own per-seed rows and median (1-step FD 51, 52, 53 → 52.0)
    assert md.index("`mini_tcd_lora`") < md.index("`cell-a`: `mini_lcm_lora` lora.rank=8")
    a_part = md[md.index("`cell-a`"):]
    assert "| seed 2 (12 s) | 53.0 / 90.0%" in a_part and "**52.0** (51.0–53.0)" in a_part
    assert "--name cell-a lora.rank=8" in a_part and "commit abc1234" in a_part
    assert "**71.0** (71.0–71.0)" in md[:md.index("`cell-a`")]  # cell-b's own median, seed 0 only
    (other,) = result["other_cells"]
    assert other["name"] == "cell-a" and [r["seed"] for r in other["rows"]] == [0, 1, 2]
    assert other["summary"]["1"]["fd_median"] == 52.0 and other["summary"]["heldout"]["4"]["fd_max"] == 92.0
    assert json.loads(out.with_suffix(".json").read_text())["other_cells"][0]["key"] == other["key"]

    # cells scored at another eval size belong to another table, not this one
    qm.main(["--seeds", "0", "--config", "mini_tcd_lora", "--name", "cell-b", *common[:-1], "30"])
    assert "`cell-a`" not in out.with_suffix(".md").read_text()


def test_a_whole_network_cell_trains_with_train_lcd_and_is_scored_as_lcm_eval_lcd(tmp_path, monkeypatch):
    """`--script train_lcd.py`: the run trains through train_lcd.py, is adopted by its final UNet, and evaluate()
    receives it as the LCD student (not as a LoRA)."""
    import lcm.evaluate

    trained, evaluated = [], []

    def train(config, overrides, seed, run_dir, threads, script="train_lcm_lora.py"):
        trained.append(script)
        (run_dir / "final" / "scheduler").mkdir(parents=True, exist_ok=True)
        (run_dir / "final" / "scheduler" / "scheduler_config.json").write_text('{"original_inference_steps": 50}')
        (run_dir / "final" / "unet").mkdir(parents=True)
        (run_dir / "final" / "unet" / "config.json").write_text("{}")
        return 1.0

    def evaluate(teacher, lora, out_dir, n, steps, prompt_sets=("train",), **kw):
        evaluated.append((lora, kw["lcd"], tuple(kw["methods"]), kw["original_inference_steps"]))
        method = kw["methods"][0]

        class Row:
            def __init__(self, k):
                self.steps, self.frechet, self.accuracy, self.diversity, self.method = k, 40.0 + k, 0.9, 30.0, method
        return [Row(k) for k in steps]

    monkeypatch.setattr(qm, "train", train)
    monkeypatch.setattr(lcm.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(qm, "commit", lambda: "abc1234")
    out = tmp_path / "q"
    common = ["--threads", "1", "--runs", str(tmp_path / "runs"), "--out", str(out), "--n", "20"]
    result = qm.main(["--seeds", "0", "--config", "mini_lcd", "--script", "train_lcd.py", "--name", "lcd", *common])
    assert trained == ["train_lcd.py"]
    run = str(tmp_path / "runs" / "lcd-s0")
    assert (None, run, ("LCD",), 50) in evaluated and all(lora is None for lora, *_ in evaluated[1:])
    assert result["rows"][0]["script"] == "train_lcd.py" and result["summary"]["2"]["fd_median"] == 42.0
    assert "Whole-network preset `mini_lcd`" in out.with_suffix(".md").read_text()
    qm.main(["--seeds", "0", "--config", "mini_lcd", "--script", "train_lcd.py", "--name", "lcd", *common])
    assert trained == ["train_lcd.py"]  # logged: not trained again
