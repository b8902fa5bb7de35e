"""benchmarks/eval_all_mini.py: adopts a run folder only when it trained the row's exact settings, retrains otherwise,
and its summary / targets are the medians over seeds of what each seed's `lcm eval` wrote."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import eval_all_mini as ea  # noqa: E402
from lcm.config import load_config, to_yaml  # noqa: E402

ADD = next(r for r in ea.ROWS if r.name == "ADD-LoRA")
LCD_ADV = next(r for r in ea.ROWS if r.name == "LCD+adv")


def fake_run(run_dir: Path, row, seed: int, extra=()):
    """A run folder as the trainers leave it: the merged config (with this machine's paths) and final weights."""
    cfg = load_config(row.config, [*ea.row_overrides(row, seed), f"train.output_dir={run_dir}",
                                   "data.path=/elsewhere/digits", "train.report_to=none", *extra],
                      schema=ea._schema(row.script))
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (run_dir / "config.yaml").write_text(to_yaml(cfg))


@pytest.mark.parametrize("row", [ADD, LCD_ADV], ids=lambda r: r.name)
def test_adopts_only_the_rows_own_settings(tmp_path, row):
    fake_run(tmp_path / "same", row, 0)
    assert ea.matches(row, 0, tmp_path / "same")  # paths and report_to do not count
    assert not ea.matches(row, 1, tmp_path / "same")  # another seed
    fake_run(tmp_path / "rank", row, 0, extra=["lora.rank=8"] if row.script == "train_lcm_lora.py"
             else ["optim.lr=0.5"])
    assert not ea.matches(row, 0, tmp_path / "rank")
    fake_run(tmp_path / "empty", row, 0)
    (tmp_path / "empty" / "final" / "pytorch_lora_weights.safetensors").unlink()
    assert not ea.matches(row, 0, tmp_path / "empty")  # no final weights: a stopped run
    # the same preset without the row's overrides (ADD's paper settings) is another cell
    bare = ea.TableRow(row.name, row.slug, row.script, row.config)
    assert not ea.matches(bare, 0, tmp_path / "same")


def test_ensure_run_trains_a_mismatch_and_adopts_a_match(tmp_path, monkeypatch):
    calls = []

    def train(config, overrides, seed, run_dir, threads, script):
        calls.append((config, tuple(overrides), seed, script))
        shutil.rmtree(run_dir, ignore_errors=True)  # as quality_mini.train does
        fake_run(run_dir, ADD, seed)
        return 12.5

    monkeypatch.setattr(ea, "train", train)
    fake_run(tmp_path / "add-toy-s0", ADD, 0, extra=["lora.rank=8"])  # stale: trained with other settings
    info = ea.ensure_run(ADD, 0, tmp_path, threads=1)
    assert calls == [("mini_add_lora", ADD.overrides, 0, "train_lcm_lora.py")]
    assert info["train_s"] == 12.5 and json.loads((tmp_path / "add-toy-s0" / "train.json").read_text()) == info
    again = ea.ensure_run(ADD, 0, tmp_path, threads=1)
    assert len(calls) == 1 and again == info


def _rows(name, fds, accs=None, div=30.0, steps=(1, 2, 4, 8)):
    accs = accs or [0.97] * len(fds)
    return [{"method": name, "steps": k, "frechet": fd, "accuracy": acc, "sec_per_image": 0.004, "diversity": div,
             "prompts": "train"} for k, fd, acc in zip(steps, fds, accs)]


def _per_seed(pcm2=(39.0, 41.0, 39.5), lightning1=(60.0, 44.0, 45.0), lightning_acc=0.97):
    per_seed = {}
    for seed in range(3):
        rows = _rows("DDIM", [132, 77, 55, 45, 42], steps=(1, 2, 4, 8, 25), div=31.5) if seed == 0 else []
        rows += _rows("LCM-LoRA", [78, 33, 31, 43])
        rows += _rows("PCM-LoRA", [80, pcm2[seed], 42, 46])
        rows += _rows("TCD-LoRA", [65, 35, 30, 31])
        rows += _rows("Lightning-LoRA", [lightning1[seed], 39, 41, 55], accs=[lightning_acc] * 4, div=26.0)
        per_seed[seed] = rows
    return per_seed


def _summary(wall=1500.0, lightning_steps=800, **kw):
    rows = [r for r in ea.ROWS if r.name in ("LCM-LoRA", "PCM-LoRA", "TCD-LoRA", "Lightning-LoRA")]
    trains = {r.name: {"train_s_median": 1000.0 if r.name != "Lightning-LoRA" else wall, "steps": 400, "batch": 64}
              for r in rows}
    trains["Lightning-LoRA"]["steps"] = lightning_steps
    return ea.summarize(_per_seed(**kw), rows, trains, [1, 2, 4, 8]), rows


def test_summary_is_median_and_range_over_seeds():
    summary, _ = _summary()
    pcm2 = summary["PCM-LoRA"]["cells"]["2"]
    assert (pcm2["fd_median"], pcm2["fd_min"], pcm2["fd_max"], pcm2["seeds"]) == (39.5, 39.0, 41.0, 3)
    assert summary["DDIM"]["cells"]["25"]["seeds"] == 1  # the teacher runs in the first seed's eval only
    assert summary["Lightning-LoRA"]["cells"]["1"]["ms_median"] == pytest.approx(4.0)


def _verdict(part: str, wall=1500.0, lightning_steps=800, **kw) -> bool:
    """The met flag of the one target whose text contains `part`."""
    summary, rows = _summary(wall, lightning_steps, **kw)
    (ok,) = [ok for t, ok, _ in ea.targets(summary, rows) if part in t]
    return ok


def test_targets_flip_with_the_medians():
    assert _verdict("1 step FD ≤ 45.6") is True  # median 45.0
    assert _verdict("PCM-LoRA row at 2 steps") is True  # median 39.5
    assert _verdict("TCD-LoRA 4 steps") is True
    assert _verdict("training wall") is True  # 1.5×
    assert _verdict("training wall", wall=2100.0) is False  # 2.1×
    assert _verdict("(steps × batch)") is True  # 800 × 64 against 400 × 64: exactly 2×
    assert _verdict("(steps × batch)", lightning_steps=801) is False
    assert _verdict("(steps × batch)", wall=5000.0) is True  # the budget does not read the wall
    assert _verdict("diversity") is True  # 26 / 31.5 = 83%
    assert _verdict("PCM-LoRA row at 2 steps", pcm2=(39.0, 41.0, 40.5)) is False  # median 40.5
    assert _verdict("1 step FD ≤ 45.6", lightning1=(60.0, 44.0, 46.0)) is False  # median 46.0
    # accuracy below 95% disqualifies the 1-step row however low its FD
    assert _verdict("1 step FD ≤ 45.6", lightning_acc=0.9) is False


def test_eval_done_needs_every_row_and_step(tmp_path):
    rows = [r for r in ea.ROWS if r.name in ("LCM-LoRA", "PCM-LoRA")]
    res = {"n": 500, "rows": _rows("LCM-LoRA", [1, 2, 3, 4]) + _rows("PCM-LoRA", [1, 2, 3])}
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert not ea.eval_done(tmp_path, rows, 500, [1, 2, 4, 8], with_teacher=False)  # PCM lacks 8 steps
    assert ea.eval_done(tmp_path, rows, 500, [1, 2, 4], with_teacher=False)
    assert not ea.eval_done(tmp_path, rows, 500, [1, 2, 4], with_teacher=True)  # no teacher rows
    assert not ea.eval_done(tmp_path, rows, 100, [1, 2, 4], with_teacher=False)  # other n
    argv = ea.eval_argv(rows, 2, tmp_path, tmp_path / "out", 500, [1, 2], with_teacher=False)
    assert argv[argv.index("--methods") + 1] == "LCM-LoRA,PCM-LoRA"
    assert f"PCM-LoRA={tmp_path / 'pcm4-lora-s2'}" in argv


def test_render_only_rewrites_the_targets_from_the_saved_summary(tmp_path):
    summary, rows = _summary()
    for row in rows:  # what train_summary adds beside the wall and the budget
        summary[row.name]["train"].update(script=row.script, config=row.config, overrides=list(row.overrides),
                                          train_s=[summary[row.name]["train"]["train_s_median"]])
    meta = {"command": "x", "platform": "p", "threads": 2, "n": 500, "seeds": 3, "wall_s": 1.0, "commit": "abc"}
    stale = {"meta": meta, "summary": summary, "targets": [{"target": "an old line", "met": False, "measured": "-"}]}
    (tmp_path / "ea.json").write_text(json.dumps(stale))
    result = ea.main(["--render-only", "--out", str(tmp_path / "ea")])
    assert result["targets"] == [{"target": t, "met": ok, "measured": m} for t, ok, m in ea.targets(summary, rows)]
    assert json.loads((tmp_path / "ea.json").read_text())["summary"] == summary  # the measurements are untouched
    md = (tmp_path / "ea.md").read_text()
    assert "an old line" not in md and "(steps × batch) | yes |" in md
    assert md == ea.markdown(summary, rows, [1, 2, 4, 8], meta)
