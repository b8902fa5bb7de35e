"""The benchmark harness measures what it claims: medians of the timed calls, a per-case peak RSS (each case in its
own process), ratios between cases of one run, JSON and markdown written side by side."""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import Case, Ratio, run_benchmark  # noqa: E402


def build_sleeper(seconds: float, mib: int):
    """Touches `mib` MiB (so they count in the process's peak RSS) and sleeps `seconds` per step."""
    pages = bytearray(mib * 2**20)
    pages[::4096] = b"x" * len(pages[::4096])
    return lambda: time.sleep(seconds)


def test_medians_rss_and_ratios(tmp_path):
    report = run_benchmark("harness check", [Case("fast", build_sleeper, {"seconds": 0.01, "mib": 1}),
                                             Case("slow", build_sleeper, {"seconds": 0.04, "mib": 200})],
                           [Ratio("time", "slow", "fast", target_max=1.0)], repeats=5, warmup=1, out_dir=tmp_path)
    fast, slow = report["cases"]
    assert fast["n"] == slow["n"] == 5
    assert 0.01 <= fast["median_s"] < 0.04 <= slow["median_s"]
    # 200 MiB held in the slow case's own process shows in its peak, not in the fast case's.
    assert slow["peak_rss_mib"] - fast["peak_rss_mib"] > 150
    (ratio,) = report["ratios"]
    assert ratio["value"] == pytest.approx(slow["median_s"] / fast["median_s"]) and ratio["met"] is False
    assert json.loads((tmp_path / "harness_check.json").read_text())["cases"][1]["name"] == "slow"
    assert "| slow |" in (tmp_path / "harness_check.md").read_text()


def test_too_few_runs_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 5"):
        run_benchmark("x", [Case("a", build_sleeper, {"seconds": 0, "mib": 1})], repeats=2, out_dir=tmp_path)
