"""`lcm serve`: a local Gradio page that redraws the image on every prompt edit.

A 1–8-step sampler is fast enough that the image can follow the typing, with no progress bar (the SDXL-Turbo and
LCM-LoRA demos). Three choices make that work:
- one warm pipeline: built once, LoRA fused into the UNet at the current strength (a fused LoRA costs nothing per step),
  re-fused only when the strength slider moves;
- latest request wins: every control fires one Gradio event with `trigger_mode="always_last"`, so while an image is being
  made the browser holds back further edits and, when it is done, sends only the newest; the stale ones in between are
  dropped, never queued. `concurrency_limit=1` runs one request at a time on the device (pages in other tabs wait their
  turn instead of fighting over the GPU);
- a failing request (bad prompt, out of memory) returns its error as the page's status text; the server keeps serving.

tests/_browser.py drives a running page from a real browser (Playwright + Chromium), for the end-to-end test and the
latency benchmark.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from PIL import Image

from .presets import build_scheduler, get_preset, resolve_preset
from .sampling import generate

logger = logging.getLogger("lcm.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DISPLAY_MIN_SIDE = 256  # small models (the 16 px mini teacher) are shown enlarged, pixel for pixel
SEED_MAX = 2**31 - 1


@dataclass(frozen=True)
class Timed:
    """One generated image and the seconds the pipeline call took."""

    image: Image.Image
    seconds: float


def teacher_scheduler_of(base: str, config_dir: Optional[str] = None):
    """The base model's own scheduler, as saved in its folder (or hub repo, or a single file's config folder): what
    the teacher samples with."""
    import diffusers
    from diffusers import DiffusionPipeline

    from .models import config_source

    base = config_source(base, config_dir)
    library, class_name = DiffusionPipeline.load_config(base)["scheduler"]
    return getattr(diffusers, class_name).from_pretrained(base, subfolder="scheduler")


class LiveSampler:
    """One warm pipeline shared by every request: the distilled model (LoRA fused at `strength`) and, on demand, the
    teacher (the same UNet with the LoRA unfused and disabled, on its own scheduler).

    `lora_weights` are the per-LoRA weights the pipeline's active adapters were loaded with; the strength slider scales
    them all. All methods hold one lock, so the pipeline is never touched by two threads at once.
    """

    def __init__(self, pipe, teacher_scheduler, lora_weights: Sequence[float] = (), eta: Optional[float] = None,
                 height: Optional[int] = None, width: Optional[int] = None, strength: float = 1.0,
                 preset: Optional[str] = None):
        self.pipe, self.teacher_scheduler, self.eta = pipe, teacher_scheduler, eta
        # a by-step-count preset (lcm-auto) swaps the pipeline's scheduler when the steps slider crosses a rule
        self.preset = preset if preset is not None and get_preset(preset).by_steps else None
        self.height, self.width = height, width
        self.lora_names = list(pipe.get_active_adapters()) if lora_weights else []
        if len(self.lora_names) != len(lora_weights):
            raise ValueError(f"{len(lora_weights)} LoRA weight(s) given for active adapters {self.lora_names}")
        self.lora_weights = list(lora_weights)
        self.strength: Optional[float] = None  # what is fused now; None = nothing fused yet
        self.lock = threading.Lock()
        self.set_strength(strength)

    @property
    def has_lora(self) -> bool:
        return bool(self.lora_names)

    def set_strength(self, strength: float) -> None:
        """Fuse the LoRA(s) at `strength` × their weights, unfusing the old strength first; a no-op when unchanged."""
        with self.lock:
            if not self.has_lora or strength == self.strength:
                return
            # Order matters: unmerging subtracts the delta at the *current* scale, so unfuse before rescaling. The scale
            # goes through set_adapters (absolute) rather than fuse_lora(lora_scale=…), which multiplies the layers'
            # scaling in place and is not undone by unfuse: re-fusing that way compounds the strength.
            if self.strength is not None:
                self.pipe.unfuse_lora()
            self.pipe.set_adapters(self.lora_names, adapter_weights=[w * strength for w in self.lora_weights])
            self.pipe.fuse_lora(adapter_names=self.lora_names)
            self.strength = strength

    def _timed(self, prompt: str, seed: int, steps: int, guidance: float, eta: Optional[float]) -> Timed:
        start = time.perf_counter()
        image = generate(self.pipe, [prompt], [seed], steps, guidance, self.height, self.width, eta=eta)[0]
        return Timed(image, time.perf_counter() - start)

    def distilled(self, prompt: str, seed: int, steps: int, guidance: float) -> Timed:
        """The few-step image with the fused LoRA (or the base alone when there is none)."""
        with self.lock:
            eta = self.eta
            if self.preset is not None:
                name, eta = resolve_preset(self.preset, steps, self.eta)
                if type(self.pipe.scheduler) is not get_preset(name).scheduler:  # the grid N rides in its config
                    self.pipe.scheduler = build_scheduler(name, self.pipe.scheduler.config)
            return self._timed(prompt, seed, steps, guidance, eta)

    @contextlib.contextmanager
    def _as_teacher(self) -> Iterator[None]:
        """The base model on its own scheduler: LoRA unfused and disabled, everything restored afterwards."""
        pipe, scheduler = self.pipe, self.pipe.scheduler
        if self.has_lora:
            pipe.unfuse_lora()
            pipe.disable_lora()
        pipe.scheduler = self.teacher_scheduler
        try:
            yield
        finally:
            pipe.scheduler = scheduler
            if self.has_lora:
                pipe.enable_lora()
                pipe.fuse_lora(adapter_names=self.lora_names)

    def teacher(self, prompt: str, seed: int, steps: int, guidance: float) -> Timed:
        """The teacher's image for the same prompt and seed (compare mode); its timing excludes the unfuse/refuse."""
        with self.lock, self._as_teacher():
            return self._timed(prompt, seed, steps, guidance, None)


def for_display(image: Image.Image, min_side: int = DISPLAY_MIN_SIDE) -> Image.Image:
    """Enlarge a small image by a whole factor with nearest-neighbour (every pixel a crisp block); big ones unchanged."""
    factor = -(-min_side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def _error_text(err: BaseException) -> str:
    if isinstance(err, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the failed request's activations back before the next one
        return "out of memory: try fewer steps, a smaller image or turn compare mode off"
    return f"{type(err).__name__}: {err}"


def make_handler(sampler: LiveSampler, distilled_label: str):
    """The page's one request: (controls) → (distilled image, teacher image, status markdown).

    Any exception is caught and shown as the status; the images keep their last value and the server carries on.
    """
    import gradio as gr

    def handle(prompt: str, steps: float, guidance: float, seed: float, strength: float, compare: bool,
               teacher_steps: float, teacher_guidance: float):
        try:
            sampler.set_strength(float(strength))
            steps, seed = int(steps), int(seed)
            student = sampler.distilled(prompt, seed, steps, float(guidance))
            lines = [f"**{distilled_label}**, {steps} step{'s' * (steps != 1)}: **{student.seconds * 1e3:.0f} ms**"]
            teacher_image = gr.update(visible=False)
            if compare:
                teacher = sampler.teacher(prompt, seed, int(teacher_steps), float(teacher_guidance))
                teacher_image = gr.update(value=for_display(teacher.image), visible=True)
                lines.append(f"**teacher** ({type(sampler.teacher_scheduler).__name__}), {int(teacher_steps)} steps, "
                             f"guidance {float(teacher_guidance):g}: **{teacher.seconds * 1e3:.0f} ms**")
            lines.append(f"seed {seed}")
            logger.info("%d steps in %.0f ms: %r", steps, student.seconds * 1e3, prompt)
            return for_display(student.image), teacher_image, "  \n".join(lines)
        except Exception as err:  # noqa: BLE001 - one bad request must not take the page down
            logger.exception("request failed (prompt %r)", prompt)
            return gr.update(), gr.update(), f"**error**: {_error_text(err)}"

    return handle


@dataclass(frozen=True)
class PageDefaults:
    """Initial values of the page's controls."""

    steps: int = 4
    guidance: float = 1.0
    seed: int = 0
    teacher_steps: int = 25
    teacher_guidance: float = 1.5
    prompt: str = ""


def build_page(sampler: LiveSampler, title: str, defaults: PageDefaults, distilled_label: str):
    """The Gradio Blocks: prompt, steps, guidance, seed (+ new seed), LoRA strength, compare mode, images, timings."""
    import gradio as gr

    with gr.Blocks(title="lcm serve", analytics_enabled=False) as page:
        gr.Markdown(f"### lcm serve: {title}")
        prompt = gr.Textbox(label="prompt (the image follows as you type)", value=defaults.prompt,
                            placeholder="type a prompt", elem_id="prompt")
        with gr.Row():
            steps = gr.Slider(1, 8, value=defaults.steps, step=1, label="steps")
            guidance = gr.Slider(0.0, 10.0, value=defaults.guidance, step=0.1, label="guidance scale (= LCM w + 1)")
            strength = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="LoRA strength", visible=sampler.has_lora)
        with gr.Row():
            seed = gr.Number(value=defaults.seed, precision=0, minimum=0, maximum=SEED_MAX, label="seed",
                             elem_id="seed")
            new_seed = gr.Button("new seed", elem_id="new-seed")
            compare = gr.Checkbox(False, label="compare with the teacher", elem_id="compare")
            teacher_steps = gr.Slider(1, 50, value=defaults.teacher_steps, step=1, label="teacher steps")
            teacher_guidance = gr.Slider(0.0, 15.0, value=defaults.teacher_guidance, step=0.1,
                                         label="teacher guidance scale")
        with gr.Row():
            image = gr.Image(label=distilled_label, type="pil", format="png", elem_id="distilled", interactive=False)
            teacher_image = gr.Image(label="teacher", type="pil", format="png", elem_id="teacher", interactive=False,
                                     visible=False)
        status = gr.Markdown("", elem_id="timing")

        controls = [prompt, steps, guidance, seed, strength, compare, teacher_steps, teacher_guidance]
        # One event for every control: "always_last" keeps at most one request in flight per page and sends only the
        # newest values once it is done; concurrency_limit=1 with one concurrency_id serialises pages on the device.
        gr.on([c.change for c in controls], make_handler(sampler, distilled_label), inputs=controls,
              outputs=[image, teacher_image, status], trigger_mode="always_last", concurrency_limit=1,
              concurrency_id="pipeline", show_progress="hidden", api_name="generate")
        new_seed.click(lambda: random.randint(0, SEED_MAX), outputs=seed, queue=False, api_visibility="private")
    return page


def serve(base: str, loras: Sequence[tuple[str, float]], preset: str, steps: int, guidance: float,
          eta: Optional[float], height: Optional[int], width: Optional[int], host: str = "127.0.0.1",
          port: int = 7860, teacher_steps: int = 25, teacher_guidance: float = 1.5, device: Optional[str] = None,
          dtype: Optional[str] = None, config_dir: Optional[str] = None) -> None:
    """Load the pipeline once, warm it up, and serve the page until interrupted."""
    from .sampling import load_pipeline_for_sampling

    pipe = load_pipeline_for_sampling(base, loras, fuse=False, device=device, dtype=dtype,
                                      preset=resolve_preset(preset, steps, eta)[0], config_dir=config_dir)
    sampler = LiveSampler(pipe, teacher_scheduler_of(base, config_dir), [w for _, w in loras], eta=eta,
                          height=height, width=width, preset=preset)
    sampler.distilled("", 0, steps, guidance)  # warm-up: first-call allocations happen before the first keystroke
    label = f"distilled ({preset} preset)" if loras else f"base model ({preset} preset, no LoRA)"
    title = " + ".join(f"`{_shown(path)}`" for path in [base, *(path for path, _ in loras)])
    page = build_page(sampler, title, PageDefaults(steps=steps, guidance=guidance, teacher_steps=teacher_steps,
                                                   teacher_guidance=teacher_guidance), label)
    logger.setLevel(logging.INFO)  # one line per request served: what a user typed and how long it took
    page.queue().launch(server_name=host, server_port=port, ssr_mode=False, show_error=True,
                        footer_links=["api", "gradio"])


def _shown(path: str) -> str:
    """A local path relative to the current folder when it lies inside it (shorter on the page); anything else as is."""
    rel = os.path.relpath(path) if Path(path).exists() else path
    return path if rel.startswith("..") else rel


def host_warning(host: str) -> Optional[str]:
    """The warning printed when the page is exposed beyond this machine (None for loopback)."""
    if host in LOOPBACK_HOSTS:
        return None
    return (f"WARNING: lcm serve is listening on {host}: anyone who can reach this machine can use the page (and its "
            "GPU); there is no authentication. Bind 127.0.0.1 (the default) unless you mean it.")
