"""A small benchmark harness: every case in its own fresh process, warm-up, medians of >= 5 timed runs, peak RSS,
ratios between cases of the same run, JSON + markdown into benchmarks/results/.

Why a process per case: peak RSS (the kernel's high-water mark) is only per case when nothing else has lived in the
process, and a fresh process also keeps one case's allocator state and compiled kernels from leaking into the next.
Why medians and rounds: the machine is shared; a median ignores the odd slow run, and `rounds > 1` alternates the
cases (A B A B …), so slow phases of the machine hit every case alike and the ratios stay fair.

A case is a *top-level* function `build(**params) -> step` (picklable by name: the child process is spawned), where
`step()` is what gets timed; building (model loading) is timed apart as `setup_s`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    """One configuration to time. `units` is what one `step()` call processes (samples, images) for the rate."""

    name: str
    build: Callable[..., Callable[[], Any]]
    params: dict = field(default_factory=dict)
    units: int = 1
    unit: str = "step"


@dataclass
class Ratio:
    """`metric(num) / metric(den)` from the same run; `target_max`/`target_min` state the goal, if any."""

    name: str
    num: str
    den: str
    metric: str = "median_s"  # any numeric field of a case result: median_s, peak_rss_mib, rate
    target_max: Optional[float] = None
    target_min: Optional[float] = None


def _rss_mib(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set in MiB.

    Linux: read from /proc, which counts this process image only. ru_maxrss is not used there: it survives exec, so a
    spawned child would report its parent's peak whenever the parent was the bigger one. Elsewhere ru_maxrss is all
    there is (macOS reports it in bytes, others in KiB).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def time_calls(step: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _child(build, params: dict, warmup: int, repeats: int, threads: int, queue) -> None:
    """Runs in the spawned process: build, warm up, time `repeats` calls, report times and the peak RSS."""
    try:
        import torch

        torch.set_num_threads(threads)
        rss_start = _rss_mib("VmRSS")  # the interpreter with torch imported: the floor under every case
        t0 = time.perf_counter()
        step = build(**params)
        setup_s = time.perf_counter() - t0
        times = time_calls(step, warmup, repeats)
        result = {"times": times, "setup_s": setup_s, "peak_rss_mib": _rss_mib(), "rss_at_start_mib": rss_start}
        if torch.cuda.is_available():  # the accelerator's peak: weights, activations, optimiser state, workspaces
            result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        queue.put(result)
    except BaseException as err:  # report, so the parent names the failing case instead of hanging
        queue.put({"error": f"{type(err).__name__}: {err}"})


def _run_in_child(case: Case, warmup: int, repeats: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(case.build, case.params, warmup, repeats, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"benchmark case {case.name!r} failed: {result['error']}")
    return result


def _summarise(case: Case, runs: list[dict]) -> dict:
    times = [t for r in runs for t in r["times"]]
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
    return {
        "name": case.name, "params": case.params, "units": case.units, "unit": case.unit,
        "n": len(times), "times_s": times, "median_s": median, "min_s": min(times), "iqr_s": q[2] - q[0],
        "rate": case.units / median,  # units per second at the median
        "setup_s": statistics.median(r["setup_s"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "rss_at_start_mib": statistics.median(r["rss_at_start_mib"] for r in runs),
        **({"peak_cuda_mib": max(r["peak_cuda_mib"] for r in runs)} if "peak_cuda_mib" in runs[0] else {}),
    }


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(threads: int) -> dict:
    """What the numbers depend on: host, CPU count, load, library versions, thread count, commit."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "threads": threads, "loadavg_start": list(os.getloadavg()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "commit": _git_commit()}


def run_benchmark(title: str, cases: list[Case], ratios: list[Ratio] = (), *, repeats: int = 5, warmup: int = 1,
                  rounds: int = 1, threads: int = 1, out_dir: Path = RESULTS_DIR, slug: Optional[str] = None,
                  command: Optional[str] = None) -> dict:
    """Run every case (`rounds` alternating passes of `repeats` timed calls each), write `<slug>.json` and `.md`."""
    if repeats * rounds < 5:
        raise ValueError(f"repeats × rounds = {repeats * rounds}: medians need at least 5 timed runs")
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names repeat: {names}")
    env = environment(threads)
    runs: dict[str, list[dict]] = {c.name: [] for c in cases}
    for r in range(rounds):
        for case in cases:
            print(f"[{title}] round {r + 1}/{rounds}: {case.name}", file=sys.stderr, flush=True)
            runs[case.name].append(_run_in_child(case, warmup, repeats, threads))
    env["loadavg_end"] = list(os.getloadavg())
    results = {c.name: _summarise(c, runs[c.name]) for c in cases}
    ratio_rows = []
    for ratio in ratios:
        value = results[ratio.num][ratio.metric] / results[ratio.den][ratio.metric]
        met = None
        if ratio.target_max is not None or ratio.target_min is not None:
            met = (ratio.target_max is None or value <= ratio.target_max) and \
                  (ratio.target_min is None or value >= ratio.target_min)
        ratio_rows.append({**asdict(ratio), "value": value, "met": met})
    report = {"title": title, "command": command or " ".join([Path(sys.executable).name, *sys.argv]),
              "repeats": repeats, "warmup": warmup, "rounds": rounds, "environment": env,
              "cases": list(results.values()), "ratios": ratio_rows}
    slug = slug or title.lower().replace(" ", "_")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{slug}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{slug}.md").write_text(to_markdown(report))
    return report


def to_markdown(report: dict) -> str:
    """A results table (one row per case) and a ratio table, with the command and environment above them."""
    env = report["environment"]
    lines = [f"## {report['title']}", "",
             f"`{report['command']}`", "",
             f"{env['cpu_count']} CPUs ({env['threads']} torch thread(s)), load average {env['loadavg_start'][0]:.2f} "
             f"→ {env['loadavg_end'][0]:.2f}, torch {env['torch']}, commit {env['commit']}"
             + (f", GPU {env['cuda']}" if env["cuda"] else "") + ". "
             f"Median of {report['repeats'] * report['rounds']} timed runs after {report['warmup']} warm-up run(s), "
             f"each case in a fresh process.", "",
             "| case | median s | IQR s | rate | peak RSS MiB | RSS after imports MiB |"
             + (" peak GPU MiB |" if env["cuda"] else ""), "|---|---|---|---|---|---|" + ("---|" if env["cuda"] else "")]
    for c in report["cases"]:
        lines.append(f"| {c['name']} | {c['median_s']:.4f} | {c['iqr_s']:.4f} | {c['rate']:.3g} {c['unit']}/s | "
                     f"{c['peak_rss_mib']:.0f} | {c['rss_at_start_mib']:.0f} |"
                     + (f" {c.get('peak_cuda_mib', 0):.0f} |" if env["cuda"] else ""))
    if report["ratios"]:
        lines += ["", "| ratio | metric | value | target | met |", "|---|---|---|---|---|"]
        for r in report["ratios"]:
            target = " and ".join(s for s in (f">= {r['target_min']}" if r["target_min"] is not None else "",
                                              f"<= {r['target_max']}" if r["target_max"] is not None else "") if s)
            met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
            lines.append(f"| {r['name']} | {r['metric']} | {r['value']:.3f} | "
                         f"{target or '—'} | {met} |")
    return "\n".join(lines) + "\n"


def bench_arg_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case and round (median over all)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case process before timing")
    p.add_argument("--rounds", type=int, default=1, help="alternating passes over the cases (A B A B …)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each case process")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown results")
    return p
