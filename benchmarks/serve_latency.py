"""Keystroke-to-image latency of `lcm serve`, measured as a user sees it: in real headless Chromium, from the key press
to the new image on the page (browser, Gradio queue, text encoders, UNet steps, VAE and PNG round trip included).

Each edit is one keystroke: alternately a letter typed at the end of the prompt and a Backspace that deletes it, so the
prompt stays a real one and every edit changes the image. The clock waits for each image before the next key (an
isolated keystroke; when keys come faster than images, `always_last` drops the stale ones instead). Reports the median
(and 10th/90th percentiles) over `--edits` edits after `--warmup` unmeasured ones, plus the server's own generation time
parsed from the page's timing line. Writes JSON + markdown into benchmarks/results/, and optionally a screenshot.

    python benchmarks/serve_latency.py                       # the mini teacher + runs/mini/lcm-lora (`lcm demo`)
    python benchmarks/serve_latency.py --screenshot docs/serve.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests._browser import (browser_page, edit_and_wait, find_chromium, press_and_wait,  # noqa: E402
                            running_server, status_text)
from tests._helpers import free_port  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (statistics.quantiles' 'inclusive' method)."""
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def server_ms(page) -> float:
    """The distilled model's generation time printed on the page (the first 'N ms')."""
    return float(re.search(r"(\d+) ms", status_text(page)).group(1))


def measure(page, prompt: str, edits: int, warmup: int) -> tuple[list[float], list[float]]:
    """(keystroke-to-image seconds, server generation ms) for `edits` one-key edits after `warmup` unmeasured ones."""
    edit_and_wait(page, prompt, replace=True)
    box = page.locator("#prompt textarea")
    box.press("End")
    latencies, generation = [], []
    for i in range(warmup + edits):
        key = string.ascii_lowercase[(i // 2) % 26] if i % 2 == 0 else "Backspace"
        seconds, _ = press_and_wait(page, key)
        if i >= warmup:
            latencies.append(seconds)
            generation.append(server_ms(page))
    return latencies, generation


def screenshot(page, prompt: str, path: Path) -> None:
    """The page in compare mode (distilled beside the teacher, both timings) for `prompt` (not the one on the page)."""
    page.locator("#compare input").check()
    page.wait_for_selector("#teacher img", timeout=60_000)
    edit_and_wait(page, prompt, replace=True)
    page.wait_for_function("() => document.querySelector('#timing').innerText.includes('teacher')")
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("serve_args", nargs="*", help="arguments for `lcm serve` (default: none = the mini teacher + LoRA)")
    p.add_argument("--edits", type=int, default=24, help="measured one-key edits (>= 20)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--prompt", default="the number 3, handwritten")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server (default: torch's)")
    p.add_argument("--name", default="serve_latency", help="results file stem")
    p.add_argument("--screenshot", type=Path, default=None, help="also save a compare-mode screenshot here")
    p.add_argument("--screenshot-prompt", default="the number 5, handwritten")
    args = p.parse_args(argv)
    if args.edits < 20:
        p.error("--edits must be >= 20")
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no system Chromium on PATH (Debian: apt-get install chromium)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    load_before = os.getloadavg()[0]
    with running_server(args.serve_args, free_port(), env=env, cwd=str(ROOT)) as server, \
            browser_page(server.url, chromium) as page:
        latencies, generation = measure(page, args.prompt, args.edits, args.warmup)
        if args.screenshot:
            screenshot(page, args.screenshot_prompt, args.screenshot)
        title = page.inner_text("h3")

    ms = [s * 1e3 for s in latencies]
    result = {
        "what": "keystroke-to-image latency of `lcm serve` in headless Chromium (one key per edit, waited on)",
        "command": " ".join(["python benchmarks/serve_latency.py", *(sys.argv[1:] if argv is None else argv)]),
        "page": title, "edits": len(ms), "warmup": args.warmup, "prompt": args.prompt,
        "median_ms": statistics.median(ms), "p10_ms": percentile(ms, 0.1), "p90_ms": percentile(ms, 0.9),
        "server_generation_median_ms": statistics.median(generation),
        "latencies_ms": [round(x, 1) for x in ms],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "omp_num_threads": env.get("OMP_NUM_THREADS"), "chromium": chromium,
                    "load_avg_1min_before_after": [load_before, os.getloadavg()[0]]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (f"# {result['what']}\n\n`{result['command']}` on {result['machine']['cpus']} CPU cores "
          f"({result['date']}; 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after: a shared "
          f"machine), page: {title}\n\n"
          "| edits | median | p10 | p90 | server generation (median) |\n|---|---|---|---|---|\n"
          f"| {len(ms)} | {result['median_ms']:.0f} ms | {result['p10_ms']:.0f} ms | {result['p90_ms']:.0f} ms | "
          f"{result['server_generation_median_ms']:.0f} ms |\n")
    (RESULTS_DIR / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
