"""`lcm serve`: the warm sampler (fused LoRA strength, teacher mode), the request handler's error path, the CLI defaults,
and one end-to-end run in real headless Chromium driven by Playwright."""

import os
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from _helpers import ROOT
from lcm import cli
from lcm.lora import add_lora, save_lora
from lcm.sampling import generate, load_pipeline_for_sampling
from lcm.serve import (LiveSampler, PageDefaults, build_page, for_display, host_warning, make_handler,
                       teacher_scheduler_of)

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def random_lora_dir(tiny_sdxl_dir, tmp_path_factory):
    """A LoRA for the tiny SDXL UNet with random (non-zero) A and B, so every strength gives a different image."""
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    params = add_lora(pipe.unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.data = torch.randn(p.shape, generator=g) * 0.3
    out = tmp_path_factory.mktemp("lora")
    save_lora(pipe.unet, out, type(pipe))
    return out


def _sampler(base, lora=None, strength=1.0):
    loras = [(str(lora), 1.0)] if lora else []
    pipe = load_pipeline_for_sampling(str(base), loras, device="cpu")
    return LiveSampler(pipe, teacher_scheduler_of(str(base)), [w for _, w in loras], strength=strength)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _unfused(base, lora, strength, seed=0):
    """Reference: the same LoRA left unfused (PEFT applies it on the fly) at adapter weight `strength`."""
    pipe = load_pipeline_for_sampling(str(base), [(str(lora), strength)], device="cpu")
    return _pixels(generate(pipe, [PROMPT], [seed], 2, 1.0)[0])


def test_fused_strength_matches_unfused_adapter_and_refusing_does_not_drift(tiny_sdxl_dir, random_lora_dir):
    sampler = _sampler(tiny_sdxl_dir, random_lora_dir, strength=0.5)
    half = _pixels(sampler.distilled(PROMPT, 0, 2, 1.0).image)
    assert np.abs(half - _unfused(tiny_sdxl_dir, random_lora_dir, 0.5)).max() <= 1  # uint8 rounding only
    sampler.set_strength(1.0)
    full = _pixels(sampler.distilled(PROMPT, 0, 2, 1.0).image)
    assert np.abs(full - _unfused(tiny_sdxl_dir, random_lora_dir, 1.0)).max() <= 1
    assert np.abs(full - half).max() > 10  # the strength really changes the image
    sampler.set_strength(0.5)  # unfuse, rescale, refuse: back to exactly the first image, no compounding
    assert np.abs(_pixels(sampler.distilled(PROMPT, 0, 2, 1.0).image) - half).max() <= 1


def test_teacher_mode_is_the_base_on_its_own_scheduler_and_restores_the_student(tiny_sdxl_dir, random_lora_dir):
    sampler = _sampler(tiny_sdxl_dir, random_lora_dir)
    before = _pixels(sampler.distilled(PROMPT, 3, 2, 1.0).image)
    teacher = _pixels(sampler.teacher(PROMPT, 3, 5, 2.0).image)
    # Reference computed another way: the saved pipeline as is, no LoRA ever loaded, its own scheduler.
    base = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    base.set_progress_bar_config(disable=True)
    assert np.abs(teacher - _pixels(generate(base, [PROMPT], [3], 5, 2.0)[0])).max() <= 1
    assert type(sampler.teacher_scheduler) is type(base.scheduler)
    assert np.abs(_pixels(sampler.distilled(PROMPT, 3, 2, 1.0).image) - before).max() <= 1


def test_lcm_auto_swaps_the_scheduler_with_the_steps_slider(tiny_sdxl_dir, random_lora_dir, monkeypatch):
    """With the lcm-auto preset the page samples 2 steps with LCMScheduler and 8 with TCD at eta 0.7 (on timesteps
    spread over the grid), keeping the scheduler's grid, and goes back; a one-sampler preset never swaps."""
    import lcm.serve
    from diffusers import LCMScheduler

    from lcm.presets import SpreadTCDScheduler

    seen = []

    def spy(pipe, prompts, seeds, steps, guidance, height, width, **kw):
        seen.append((type(pipe.scheduler), pipe.scheduler.config.original_inference_steps, kw.get("eta"), steps))
        return generate(pipe, prompts, seeds, steps, guidance, height, width, **kw)

    monkeypatch.setattr(lcm.serve, "generate", spy)
    pipe = load_pipeline_for_sampling(str(tiny_sdxl_dir), [(str(random_lora_dir), 1.0)], device="cpu", preset="lcm")
    grid = pipe.scheduler.config.original_inference_steps
    sampler = LiveSampler(pipe, teacher_scheduler_of(str(tiny_sdxl_dir)), [1.0], preset="lcm-auto")
    for steps in (2, 8, 2):
        sampler.distilled(PROMPT, 0, steps, 1.0)
    assert seen == [(LCMScheduler, grid, None, 2), (SpreadTCDScheduler, grid, 0.7, 8), (LCMScheduler, grid, None, 2)]
    fixed = LiveSampler(pipe, teacher_scheduler_of(str(tiny_sdxl_dir)), [1.0], preset="lcm")
    fixed.distilled(PROMPT, 0, 8, 1.0)
    assert seen[-1][0] is LCMScheduler


def test_failing_request_shows_an_error_and_the_next_one_is_served(tiny_sdxl_dir, monkeypatch):
    sampler = _sampler(tiny_sdxl_dir)
    handle = make_handler(sampler, "distilled")
    args = dict(prompt=PROMPT, steps=2, guidance=1.0, seed=0, strength=1.0, compare=False, teacher_steps=3,
                teacher_guidance=1.5)
    real = sampler.distilled

    def out_of_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(sampler, "distilled", out_of_memory)
    image, _, status = handle(**args)
    assert "error" in status and "out of memory" in status
    assert image == {"__type__": "update"}  # the page keeps its last image
    monkeypatch.setattr(sampler, "distilled", real)
    image, teacher, status = handle(**{**args, "compare": True})
    assert image.size == for_display(real(PROMPT, 0, 2, 1.0).image).size
    assert teacher["visible"] is True and "teacher" in status and " ms" in status
    assert "error" not in status


def test_page_builds_with_one_latest_wins_event(tiny_sdxl_dir):
    page = build_page(_sampler(tiny_sdxl_dir), "tiny", PageDefaults(), "distilled")
    (dep,) = [d for d in page.config["dependencies"] if d["api_name"] == "generate"]
    assert dep["trigger_mode"] == "always_last"  # the browser holds back edits while one is in flight, sends the newest
    assert len(dep["targets"]) == 8  # every control redraws
    (fn,) = [f for f in page.fns.values() if f.api_name == "generate"]
    assert fn.concurrency_limit == 1  # one request on the device at a time


def test_for_display_enlarges_small_images_pixel_for_pixel():
    small = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()
    from PIL import Image

    big = for_display(Image.fromarray(small))
    assert big.size == (256, 256)
    assert (np.asarray(big)[::16, ::16] == small).all()  # every source pixel is a 16 × 16 block
    large = Image.new("RGB", (512, 300))
    assert for_display(large) is large


def test_host_warning_and_cli_defaults(tmp_path, monkeypatch, capsys):
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert "0.0.0.0" in host_warning("0.0.0.0") and "WARNING" in host_warning("0.0.0.0")
    monkeypatch.chdir(tmp_path)
    # No LoRA from the main job yet: the mini teacher alone, with a message saying how to make one.
    assert cli.default_model(None, []) == (str(cli.MINI_TEACHER), [])
    assert "lcm demo" in capsys.readouterr().out
    weights = tmp_path / cli.MINI_LORA_RUN / "final" / "pytorch_lora_weights.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert cli.default_model(None, []) == (str(cli.MINI_TEACHER), [(str(cli.MINI_LORA_RUN), 1.0)])
    assert cli.default_model("other", [("x", 0.5)]) == ("other", [("x", 0.5)])  # explicit choices win
    # The CLI wiring: preset defaults filled, the warning printed for a non-loopback host.
    seen = {}
    monkeypatch.setattr("lcm.serve.serve", lambda *a, **k: seen.update(args=a, kwargs=k))
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "7999"]) == 0
    assert "WARNING" in capsys.readouterr().err
    base, loras, preset, steps, guidance = seen["args"][:5]
    assert (base, preset, steps, guidance, seen["kwargs"]["port"]) == (str(cli.MINI_TEACHER), "lcm", 4, 1.0, 7999)
    with pytest.raises(SystemExit, match="steps"):
        cli.main(["serve", "--steps", "9"])


# ------------------------------------------------------------------------------------------------ real browser, e2e
def test_page_in_headless_chromium(tiny_sdxl_dir, random_lora_dir):
    """Type a prompt, get an image; type more, get a different one with its timing; compare mode shows the teacher;
    a burst of keystrokes is served with fewer generations than keys and ends on the full prompt (latest wins)."""
    pytest.importorskip("playwright", reason="playwright is not installed (pip install -e '.[dev]')")
    from tests._browser import browser_page, edit_and_wait, find_chromium, image_src, running_server, status_text
    from tests._helpers import free_port

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no system Chromium (Debian: apt-get install chromium; .ci/run installs it)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--base", str(tiny_sdxl_dir), "--lora", str(random_lora_dir), "--teacher-steps", "3"]
    with running_server(args, free_port(), env=env, cwd=str(ROOT)) as server, browser_page(server.url, chromium) as page:
        _, first = edit_and_wait(page, "a red", replace=True)
        assert first and " ms" in status_text(page)
        _, second = edit_and_wait(page, " circle")
        assert second != first
        assert "4 steps" in status_text(page)

        page.locator("#compare input").check()
        page.wait_for_selector("#teacher img", timeout=60_000)
        page.wait_for_function("() => document.querySelector('#timing').innerText.includes('teacher')")
        assert status_text(page).count(" ms") == 2  # both timings
        page.locator("#compare input").uncheck()
        page.wait_for_selector("#teacher img", state="hidden", timeout=60_000)

        served_before = sum("steps in" in line for line in server.log)
        burst = " on a white background"
        edit_and_wait(page, burst)
        full = f"a red circle{burst}"
        deadline = time.monotonic() + 30
        while not any(repr(full) in line for line in server.log) and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert any(line.rstrip().endswith(repr(full)) for line in server.log), "".join(server.log[-5:])
        # Typing the burst fires one change per key; the ones that arrived while an image was being made were dropped.
        served = sum("steps in" in line for line in server.log) - served_before
        assert 1 <= served < len(burst), f"{served} generations for {len(burst)} keys"
        assert image_src(page) is not None
        print(f"{served} generations for {len(burst)} keystrokes", file=sys.stderr)
