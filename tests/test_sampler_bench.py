"""benchmarks/sampler_mini.py's bookkeeping, with training and scoring faked: one row per sampler (the lcm-auto row
with --auto), a rerun skips the seeds its log holds, and the 8 / 4 ratio column is each seed's own."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import sampler_mini as sm  # noqa: E402


def test_sampler_rows_log_and_ratio(tmp_path, monkeypatch):
    trained, scored = [], []

    def train(config, overrides, seed, run_dir, threads, script="train_lcm_lora.py"):
        trained.append((config, seed, threads, script))
        (run_dir / "final").mkdir(parents=True)
        (run_dir / "final" / "pytorch_lora_weights.safetensors").write_bytes(b"")
        return 5.0

    def score_seed(run_dir, out, gammas, steps, n, auto=False, spread=False):
        seed = int(run_dir.name.rsplit("-s", 1)[1])
        scored.append((seed, auto) + (("spread",) if spread else ()))
        # every sampler: FD 30 + seed at 4 steps; LCM collapses at 8 (×1.4), the others do not (×1.05)
        names = [name for name, _ in sm.samplers(gammas, auto, spread)]
        return {name: {str(k): {"fd": (30.0 + seed) * (1.4 if name == "LCM" and k == 8 else 1.05 if k == 8 else 1.0),
                                "acc": 0.9} for k in steps} for name in names}

    monkeypatch.setattr(sm, "train", train)
    monkeypatch.setattr(sm, "score_seed", score_seed)
    monkeypatch.setattr(sm, "commit", lambda: "abc1234")
    out = tmp_path / "res" / "s"
    args = ["--seeds", "0-1", "--gammas", "0.7", "--steps", "4,8", "--runs", str(tmp_path / "runs"), "--out", str(out),
            "--threads", "2", "--auto"]
    # the LCM row names its scheduler: a TCD run's own saved scheduler is TCD, not LCMScheduler
    assert [spec for _, spec in sm.samplers([0.7], auto=True)] == ["lcm", "tcd@0.7", "lcm-auto"]
    sm.main(args)
    assert trained == [("mini_lcm_lora", s, 2, "train_lcm_lora.py") for s in (0, 1)]
    assert scored == [(0, True), (1, True)]
    sm.main(args)  # both seeds are logged: nothing is trained or scored again
    assert len(scored) == 2
    md = out.with_suffix(".md").read_text()
    assert "| LCM | 1 | 31.0 / 90.0% | 43.4 / 90.0% | 1.40 |" in md
    median_row = "| **lcm-auto, median of 2** (min–max) | | **30.5** (30.0–31.0) | **32.0** (31.5–32.6) | worst 1.05 |"
    assert median_row in md
    assert "--auto" in md and "abc1234" in md
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["seed"] for r in rows] == [0, 1] and rows[0]["key"]["auto"] is True
    # the same seeds without --auto are another key: scored again, into the same log
    sm.main([a for a in args if a != "--auto"])
    assert scored[2:] == [(0, False), (1, False)]
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 4
    # --spread: TCD rows on timesteps spread over the grid (the tcd-spread preset), a key of their own
    assert [spec for _, spec in sm.samplers([0.7, 0.8], auto=True, spread=True)] == [
        "lcm", "tcd@0.7", "tcd@0.8", "tcd-spread@0.7", "tcd-spread@0.8", "lcm-auto"]
    sm.main(args + ["--spread"])
    assert scored[4:] == [(0, True, "spread"), (1, True, "spread")]
    assert "| TCD spread γ=0.7 | 1 | 31.0 / 90.0% | 32.6 / 90.0% | 1.05 |" in out.with_suffix(".md").read_text()
    assert "--auto --spread" in out.with_suffix(".md").read_text()


def test_whole_unet_runs_are_adopted_by_their_unet_and_trained_with_train_lcd(tmp_path, monkeypatch):
    """`--config mini_lcd --script train_lcd.py --name lcd`: a run folder holding final/unet is scored as it is; a
    missing one is trained by train_lcd.py under that name; the cell is its own key, apart from the LoRA's."""
    trained, scored = [], []
    monkeypatch.setattr(sm, "train", lambda config, overrides, seed, run_dir, threads, script: trained.append(
        (config, seed, script, run_dir.name)) or 1.0)
    monkeypatch.setattr(sm, "score_seed", lambda run_dir, out, gammas, steps, n, auto=False, spread=False:
                        scored.append(run_dir.name) or {name: {str(k): {"fd": 30.0, "acc": 0.9} for k in steps}
                                                        for name, _ in sm.samplers(gammas, auto)})
    monkeypatch.setattr(sm, "commit", lambda: "abc1234")
    runs = tmp_path / "runs"
    (runs / "lcd-s0" / "final" / "unet").mkdir(parents=True)
    (runs / "lcd-s0" / "final" / "unet" / "config.json").write_text("{}")
    out = tmp_path / "s"
    sm.main(["--seeds", "0-1", "--gammas", "0.7", "--steps", "4,8", "--runs", str(runs), "--out", str(out),
             "--config", "mini_lcd", "--script", "train_lcd.py", "--name", "lcd", "--auto"])
    assert trained == [("mini_lcd", 1, "train_lcd.py", "lcd-s1")] and scored == ["lcd-s0", "lcd-s1"]
    md = out.with_suffix(".md").read_text()
    assert "--config mini_lcd --script train_lcd.py --name lcd" in md and "`configs/mini_lcd.yaml`" in md
    key = sm.json.loads(out.with_suffix(".json").read_text())["rows"][0]["key"]
    assert key["config"] == "mini_lcd" and key["name"] == "lcd"
    # another --name is other runs: its seeds are scored, not taken from the first name's rows in the same log
    (runs / "lcd2-s0" / "final" / "unet").mkdir(parents=True)
    (runs / "lcd2-s0" / "final" / "unet" / "config.json").write_text("{}")
    sm.main(["--seeds", "0", "--gammas", "0.7", "--steps", "4,8", "--runs", str(runs), "--out", str(out),
             "--config", "mini_lcd", "--script", "train_lcd.py", "--name", "lcd2", "--auto"])
    assert scored[-1] == "lcd2-s0"


def test_overrides_train_the_missing_runs_and_key_the_cell(tmp_path, monkeypatch):
    """Trailing key=value overrides go to the training of a missing run, into the log's key (the same seeds without
    them are other students) and into the command shown in the table."""
    trained = []
    monkeypatch.setattr(sm, "train", lambda config, overrides, seed, run_dir, threads, script: trained.append(
        (config, list(overrides), seed)) or 1.0)
    monkeypatch.setattr(sm, "score_seed", lambda run_dir, out, gammas, steps, n, auto=False, spread=False: {
        name: {str(k): {"fd": 30.0, "acc": 0.9} for k in steps} for name, _ in sm.samplers(gammas, auto)})
    monkeypatch.setattr(sm, "commit", lambda: "abc1234")
    out = tmp_path / "s"
    base = ["--seeds", "0", "--gammas", "0.5", "--steps", "4,8", "--runs", str(tmp_path / "runs"), "--out", str(out),
            "--config", "mini_tcd_lora", "--name", "mix"]
    sm.main(base + ["distill.tcd_clean_share=0.5"])
    assert trained == [("mini_tcd_lora", ["distill.tcd_clean_share=0.5"], 0)]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows[0]["key"]["overrides"] == ["distill.tcd_clean_share=0.5"]
    assert "--name mix distill.tcd_clean_share=0.5`" in out.with_suffix(".md").read_text()
    sm.main(base)  # without the override: another key, so the seed is scored (and, faked here, trained) again
    assert len(trained) == 2 and trained[1][1] == []


def test_rule_rows_are_composed_from_the_cells_their_rule_picks(tmp_path, monkeypatch):
    """--rule tcd-mix-auto adds a row that takes, at each step count, the cell of the sampler its rule picks (LCM at
    1–2, TCD γ 0.7 at 3–4, γ 0.5 at 5–6, γ 0.5 on spread timesteps from 7); a rule whose sampler was not scored is
    refused, naming the missing gamma (and --spread)."""
    import pytest

    rows = [{"seed": 0, "scores": {name: {str(k): {"fd": fd + k, "acc": 0.9} for k in (1, 2, 4, 6, 8)}
                                   for name, fd in (("LCM", 100.0), ("TCD γ=0.5", 200.0), ("TCD γ=0.7", 300.0),
                                                    ("TCD spread γ=0.5", 400.0))}}]
    got = sm.with_rules(rows, ["tcd-mix-auto"], [0.5, 0.7], [1, 2, 4, 6, 8])[0]["scores"]["tcd-mix-auto"]
    assert {k: v["fd"] for k, v in got.items()} == {"1": 101.0, "2": 102.0, "4": 304.0, "6": 206.0, "8": 408.0}
    assert "tcd-mix-auto" not in rows[0]["scores"]  # the logged rows are left as they were
    with pytest.raises(SystemExit, match="6 steps with tcd@0.5: add it to --gammas"):
        sm.with_rules(rows, ["tcd-mix-auto"], [0.7], [1, 2, 4, 6, 8])
    del rows[0]["scores"]["TCD spread γ=0.5"]
    with pytest.raises(SystemExit, match="tcd-spread@0.5: add it to --gammas and give --spread"):
        sm.with_rules(rows, ["tcd-mix-auto"], [0.5, 0.7], [1, 2, 4, 8])
    with pytest.raises(SystemExit, match="not a by-step-count preset"):
        sm.with_rules(rows, ["lcm"], [0.7], [1, 2, 4, 8])
