"""Driving a running `lcm serve` page from a real browser (Playwright + headless system Chromium): used by
tests/test_serve.py and benchmarks/serve_latency.py, so it lives with the tests rather than in the package."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence


def find_chromium() -> Optional[str]:
    """The system Chromium (Debian's `chromium`): $LCM_CHROMIUM, else the first on PATH; None when absent."""
    for name in (os.environ.get("LCM_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


@dataclass
class ServerProcess:
    """A running `lcm serve` child: its URL and everything it has printed so far (one line per request served)."""

    url: str
    log: list[str]


@contextlib.contextmanager
def running_server(args: Sequence[str], port: int, timeout: float = 120.0, env: Optional[dict] = None,
                   cwd: Optional[str] = None) -> Iterator[ServerProcess]:
    """`lcm serve ARGS --port PORT` in a child process, yielded once it answers; stopped on exit."""
    server = ServerProcess(f"http://127.0.0.1:{port}/", [])
    cmd = [sys.executable, "-m", "lcm.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    reader = threading.Thread(target=lambda: server.log.extend(proc.stdout), daemon=True)  # keeps the pipe drained
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                reader.join(5)
                raise RuntimeError(f"lcm serve exited with {proc.returncode}:\n{''.join(server.log)}")
            try:
                urllib.request.urlopen(server.url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lcm serve did not answer on {server.url} in {timeout:.0f} s:\n"
                                       f"{''.join(server.log)}")
                time.sleep(0.25)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def browser_page(url: str, chromium: str, viewport=(1280, 900)) -> Iterator:
    """A Playwright page in headless system Chromium (no browser download), opened at `url`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.goto(url)
            page.wait_for_selector("#prompt textarea")
            yield page
        finally:
            browser.close()


def image_src(page, elem_id: str = "distilled") -> Optional[str]:
    """The `src` of the image shown in the component `elem_id`, or None while it has none."""
    return page.evaluate(f"() => document.querySelector('#{elem_id} img')?.getAttribute('src') ?? null")


def _timed_change(page, act, timeout_ms: float) -> tuple[float, str]:
    """Run `act()` (key presses), then wait until the shown image changes: (seconds from the first key, new src)."""
    before = image_src(page)
    start = time.perf_counter()
    act()
    page.wait_for_function("(old) => { const i = document.querySelector('#distilled img');"
                           " return i !== null && i.getAttribute('src') !== old; }", arg=before, timeout=timeout_ms,
                           polling="raf")
    return time.perf_counter() - start, image_src(page)


def edit_and_wait(page, text: str, replace: bool = False, timeout_ms: float = 60_000) -> tuple[float, str]:
    """Type `text` at the end of the prompt (or replace the prompt with it) and wait for the new image.

    Returns (seconds from the first key press to the new image, its src): with one character this is the
    keystroke-to-image latency a user sees, browser and server included.
    """
    box = page.locator("#prompt textarea")
    if replace:
        return _timed_change(page, lambda: box.fill(text), timeout_ms)
    box.press("End")
    return _timed_change(page, lambda: box.press_sequentially(text), timeout_ms)


def press_and_wait(page, key: str, timeout_ms: float = 60_000) -> tuple[float, str]:
    """Press one named key in the prompt box ("Backspace", "a", …) and wait for the new image, as `edit_and_wait`."""
    box = page.locator("#prompt textarea")
    return _timed_change(page, lambda: box.press(key), timeout_ms)


def status_text(page) -> str:
    """The timing/status line under the images."""
    return page.inner_text("#timing")
