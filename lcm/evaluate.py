"""The few-step quality table (LCM Table 1 in miniature): teacher solvers vs the distilled students at 1, 2, 4, 8 steps.

Students: LCM-LoRA (adapters on the teacher's UNet, sampled at `student_guidance`) and full LCD (a whole UNet with a
guidance embedding, sampled at guidance_scale = w + 1 with the teacher's w: the stock pipeline embeds guidance_scale − 1
and runs no CFG pass for such a UNet).

Metrics on the digits mini teacher: prompt accuracy (the shipped classifier recognises the prompted digit), the Fréchet
distance between classifier-feature statistics of generated and real held-out digits (catches blur and lost diversity,
which accuracy alone rewards), and seconds per image. Every row sees the same prompts and seeds, one generator per image.
`prompt_sets` picks the prompt text: "train" (the caption templates the teacher and students trained on) and/or
"heldout" (templates no training caption uses, `lcm.digits.HELD_OUT_TEMPLATES`: a student that memorised the training
strings shows it there). The digits asked for and the real held-out digits of the FD reference are the same for both.
Teacher baselines use `timestep_spacing="trailing"` so their first step is at t = 999: with diffusers' default
"leading" spacing a 1-step DDIM runs at t = 0 and a 2-step one starts at t = 500, which are meaningless baselines.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from diffusers import (DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, UNet2DConditionModel)

from .constants import NUM_DDIM_TIMESTEPS
from .guidance import guidance_scale_from_w
from .lora import load_pipeline_lora
from .models import load_pretrained
from .presets import build_scheduler, get_preset, resolve_preset, split_preset_spec
from .sampling import (image_grid, lcm_scheduler_for, resolve_lora_dir, resolve_student_dir, saved_eta,
                       saved_scheduler, saved_timesteps)

TEACHER_SOLVERS = {
    "DDIM": lambda c: DDIMScheduler.from_config(c, timestep_spacing="trailing", clip_sample=False,
                                                set_alpha_to_one=False),
    "DPM-Solver++": lambda c: DPMSolverMultistepScheduler.from_config(c, timestep_spacing="trailing",
                                                                      algorithm_type="dpmsolver++", solver_order=2),
    "Euler": lambda c: EulerDiscreteScheduler.from_config(c, timestep_spacing="trailing"),
    # Stochastic (SDE) sampling: fresh noise at every step. Not a default row; asked for by name, it measures how far
    # the teacher's SDE samples lie from its PF-ODE's (the floor a deterministic distillation aims at).
    "Euler ancestral": lambda c: EulerAncestralDiscreteScheduler.from_config(c, timestep_spacing="trailing"),
}
DEFAULT_TEACHER_ROWS = ("DDIM", "DPM-Solver++", "Euler")  # the teacher rows `lcm eval` gives with no --methods
STUDENTS = ("LCM-LoRA", "LCD")
LoraSpec = Union[None, str, Path, Sequence[Union[str, Path, tuple]], Mapping[str, Union[str, Path]]]


def default_student_name(path) -> str:
    """A LoRA student's row name from its folder: the run folder (not `final/`), or the folder holding the file."""
    p = Path(path)
    folder = p.parent if p.suffix == ".safetensors" else p
    return folder.parent.name if folder.name == "final" else folder.name


def lora_students(lora: LoraSpec) -> dict[str, str]:
    """Row name → LoRA path. One unnamed LoRA keeps the row name "LCM-LoRA"; several are named by their folders.

    Takes a path, a list of paths and/or (name, path) pairs (name None: from the folder), or a {name: path} dict.
    """
    if lora is None:
        return {}
    if isinstance(lora, Mapping):
        items = [(str(k), v) for k, v in lora.items()]
    else:
        items = [(None, x) if isinstance(x, (str, Path)) else tuple(x) for x in
                 ([lora] if isinstance(lora, (str, Path)) else lora)]
        if len(items) == 1 and items[0][0] is None:
            items = [("LCM-LoRA", items[0][1])]
        items = [(name or default_student_name(path), path) for name, path in items]
    names = [name for name, _ in items]
    clash = sorted({n for n in names if names.count(n) > 1 or n in TEACHER_SOLVERS or n == "LCD"})
    if clash:
        raise ValueError(f"LoRA student row names must be unique and differ from {[*TEACHER_SOLVERS, 'LCD']}: "
                         f"{clash}; name them with --lora NAME=PATH")
    return {name: str(path) for name, path in items}


def named_students(students: Sequence[tuple], reserved: Sequence[str] = ()) -> dict[str, tuple[str, Optional[str]]]:
    """`--student` rows: name → (run, preset or None). Names must be unique and differ from the teacher solvers and
    the other students' rows; an unknown preset is an error here, before anything is loaded."""
    out: dict[str, tuple[str, Optional[str]]] = {}
    for name, run, preset in students:
        if preset is not None:
            split_preset_spec(preset)
        if name in out or name in TEACHER_SOLVERS or name in reserved:
            raise ValueError(f"--student row name {name!r} is taken; row names must be unique and differ from "
                             f"{[*TEACHER_SOLVERS, *reserved]}")
        out[name] = (str(run), preset)
    return out


def student_kind(run) -> str:
    """"lora" for a LoRA run (or its weights), "lcd" for a whole-network student; neither is an error naming both."""
    try:
        resolve_lora_dir(run)
        return "lora"
    except FileNotFoundError:
        pass
    try:
        resolve_student_dir(run)
        return "lcd"
    except FileNotFoundError:
        raise FileNotFoundError(f"--student {run!r}: neither LoRA weights nor a whole-network student "
                                "(a train_lcm_lora.py or train_lcd.py run folder)") from None


@dataclass
class Row:
    method: str
    steps: int
    guidance_scale: float
    accuracy: float
    frechet: float
    sec_per_image: float
    prompts: str = "train"  # the prompt set (lcm.digits.PROMPT_SETS): training templates or held-out ones
    diversity: float = float("nan")  # classifier.class_diversity of the row's samples, per prompted class


@torch.no_grad()
def sample_tensors(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float,
                   batch_size: int = 250, **call_kwargs) -> tuple[torch.Tensor, float]:
    """Images (N, 3, H, W) in [-1, 1] for prompt i with seed i, and the wall seconds it took. `call_kwargs` go to
    the pipeline call (a TCD row's `eta`)."""
    out, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch_size]]
        images = pipe(prompt=list(prompts[i:i + batch_size]), num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=gens, output_type="pt", **call_kwargs).images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out), time.perf_counter() - start


def evaluate(teacher: str, lora: LoraSpec, out_dir, n: int = 500, steps: Sequence[int] = (1, 2, 4, 8),
             teacher_extra_steps: Sequence[int] = (25,), teacher_w: float = 1.5, student_guidance: float = 1.0,
             original_inference_steps: int = NUM_DDIM_TIMESTEPS, methods: Optional[Sequence[str]] = None,
             lcd: Optional[str] = None, prompt_sets: Sequence[str] = ("train",),
             config_dir: Optional[str] = None, students: Sequence[tuple] = ()) -> list[Row]:
    """Run every (method, steps, prompt set) cell; write results.json, table.md, one grid per row and plot.png to
    `out_dir`. `teacher` is a diffusers folder or a single-file checkpoint (configs from `config_dir`).

    A student row runs only when its weights are given (`lora`, `lcd`); asking for it by name without them is an error.
    `lora` may hold several LoRA students (see `lora_students`), each its own named rows; in `methods`, "LCM-LoRA"
    stands for all of them and a student's name for that one. How each kind of row sets up its sampler and guidance
    is its entry in `ROW_KINDS`. `students` holds (name, run, preset or None) triples (`lcm eval --student
    NAME=RUN[:preset]`): the run may be a LoRA or a whole-network student (told apart by its files), and a preset
    samples it with that preset's scheduler instead of the one its run saved (see `_student_scheduler`).
    """
    from .classifier import digit_features
    from .digits import PROMPT_SETS, eval_prompts, load_digits_tensors

    out = Path(out_dir)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    if not prompt_sets or any(p not in PROMPT_SETS for p in prompt_sets):
        raise ValueError(f"prompt sets {list(prompt_sets)}: choose from {', '.join(PROMPT_SETS)}")
    prompt_table = {name: eval_prompts(n, name) for name in dict.fromkeys(prompt_sets)}
    pipe = load_pretrained(DiffusionPipeline, teacher, config_dir)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    real, _ = load_digits_tensors("held_out", size=size)
    real_feats = digit_features(real)
    loras = lora_students(lora)
    named = named_students(students, reserved=[*loras, *(["LCD"] if lcd else [])])
    methods = _expand_methods(methods or [*DEFAULT_TEACHER_ROWS, *loras, *(["LCD"] if lcd else []), *named], loras,
                              named)
    plan = _row_plan(methods, loras, lcd, named)
    setup = RowSetup(pipe, pipe.scheduler.config, list(steps), list(teacher_extra_steps),
                     guidance_scale_from_w(teacher_w), student_guidance, original_inference_steps)
    rows: list[Row] = []
    for name, kind, source in plan:
        path, spec = source if isinstance(source, tuple) else (source, None)
        preset, given_eta = split_preset_spec(spec) if spec else (None, None)
        eta = given_eta
        if eta is None and preset:  # the preset's own eta
            eta = get_preset(preset).eta
        setup.preset = preset
        with ROW_KINDS[kind](setup, name, path) as (guidance_scale, row_steps):
            for k in row_steps:
                timesteps = None
                if preset is not None and get_preset(preset).by_steps:  # lcm-auto: this step count's sampler
                    rule, eta = resolve_preset(preset, k, given_eta)
                    pipe.scheduler = _student_scheduler(setup, setup.saved, rule)
                elif preset is None and given_eta is None and kind != "teacher":
                    eta = saved_eta(path, k)  # sampled as saved: the eta its card gives at k steps (TCD's gamma)
                    timesteps = saved_timesteps(path, k, pipe.scheduler.config.num_train_timesteps)  # and its list
                call = ({"eta": eta} if eta is not None else {}) | ({"timesteps": timesteps} if timesteps else {})
                rows += _run_cells(pipe, name, k, guidance_scale, prompt_table, real_feats, out, **call)
    real_vs_real = _real_vs_real(real_feats, size)
    (out / "results.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "n": n, "teacher_w": teacher_w,
                                                  "real_vs_real_frechet": real_vs_real,
                                                  "prompt_sets": {k: PROMPT_SETS[k] for k in prompt_table}}, indent=2))
    (out / "table.md").write_text(markdown_table(rows, real_vs_real, n))
    plot(rows, out / "plot.png")
    return rows


def _run_cells(pipe, name: str, k: int, guidance_scale: float, prompt_table: dict, real_feats: torch.Tensor,
               out: Path, **call_kwargs) -> list[Row]:
    """One method at k steps on every prompt set (same seeds and digits, other prompt text): a Row and a grid each."""
    from .classifier import class_diversity, classify, digit_features, frechet_distance

    rows = []
    for prompt_set, (prompts, labels) in prompt_table.items():
        n = len(prompts)
        images, secs = sample_tensors(pipe, prompts, list(range(n)), k, guidance_scale, **call_kwargs)
        acc = (classify(images) == torch.tensor(labels)).float().mean().item()
        feats = digit_features(images)
        row = Row(name, k, guidance_scale, acc, frechet_distance(feats, real_feats), secs / n, prompt_set,
                  class_diversity(feats, torch.tensor(labels)))
        rows.append(row)
        grid = [_to_pil(images[i]) for i in range(min(len(images), 40))]
        stem = re.sub(r"[^\w.-]", "_", name.replace("+", "p"))  # a student's name may come from any folder
        stem += f"_{k}step" + ("" if prompt_set == "train" else "_heldout")
        image_grid(grid, 10).save(out / "grids" / f"{stem}.png")
        print(f"{name:>14} {k:>3} steps {prompt_set:>8}  acc {acc:6.1%}  FD {row.frechet:8.2f}  "
              f"{row.sec_per_image * 1e3:7.2f} ms/img", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------ row kinds
# A row kind is a context manager `(setup, name, source) -> (guidance_scale, steps)`: inside it the pipeline samples
# as that row's method (its scheduler, its weights); on exit the teacher pipeline is as it was. A new student kind is
# one entry in ROW_KINDS plus the names it answers to in `_row_plan`.

@dataclass
class RowSetup:
    """What every row kind reads: the teacher pipeline, its own scheduler config and the table's step/guidance choices."""

    pipe: object
    base_config: dict
    steps: list[int]
    teacher_extra_steps: list[int]  # DDIM only: a many-step reference row
    teacher_guidance: float  # diffusers guidance_scale = teacher w + 1
    student_guidance: float
    original_inference_steps: int  # the students' N (LCMScheduler grid)
    preset: Optional[str] = None  # the current student row's --student …:PRESET, if any
    saved: object = None  # the current student row's saved scheduler, set by its row kind (a by-step-count preset
    # rebuilds its scheduler from it at each step count)


@contextlib.contextmanager
def _teacher_row(setup: RowSetup, name: str, source=None) -> Iterator[tuple[float, list[int]]]:
    """A teacher solver from TEACHER_SOLVERS at the teacher's CFG."""
    setup.pipe.scheduler = TEACHER_SOLVERS[name](setup.base_config)
    yield setup.teacher_guidance, setup.steps + (setup.teacher_extra_steps if name == "DDIM" else [])


@contextlib.contextmanager
def _lora_row(setup: RowSetup, name: str, source: str) -> Iterator[tuple[float, list[int]]]:
    """A LoRA student: the LoRA fused into the teacher's UNet, sampled at `student_guidance` with the scheduler its run
    saved: LCMScheduler on the grid N it trained on (the table's N when the run saved none), or another one (an ADD
    LoRA: Euler ancestral, trailing)."""
    lora = resolve_lora_dir(source)
    with _fused_student(setup.pipe, lora):
        setup.saved = saved_scheduler(lora)
        setup.pipe.scheduler = _student_scheduler(setup, setup.saved, setup.preset)
        yield setup.student_guidance, setup.steps


@contextlib.contextmanager
def _lcd_row(setup: RowSetup, name: str, source: str) -> Iterator[tuple[float, list[int]]]:
    """A full-LCD student: its whole UNet in place of the teacher's, LCMScheduler (or the scheduler its run saved, for
    a whole-UNet ADD student), at guidance_scale = w + 1 with the teacher's w (the student embeds w = g − 1; the stock pipeline runs no CFG pass for such a UNet)."""
    pipe, teacher_unet = setup.pipe, setup.pipe.unet
    folder = resolve_student_dir(source)
    pipe.unet = UNet2DConditionModel.from_pretrained(folder)
    try:
        if pipe.unet.config.time_cond_proj_dim is None:
            raise ValueError(f"{source}: this UNet has no guidance embedding (time_cond_proj_dim); not a full-LCD student")
        setup.saved = saved_scheduler(folder.parent)
        pipe.scheduler = _student_scheduler(setup, setup.saved, setup.preset)
        yield setup.teacher_guidance, setup.steps
    finally:
        pipe.unet = teacher_unet


def _student_scheduler(setup: RowSetup, saved, preset: Optional[str] = None):
    """LCMScheduler on the teacher's betas with the N the run saved (else the table's N), or the run's own other
    scheduler as saved. Sampling an N = 25 student on the 50-step grid would ask it for timesteps it never saw.

    A `preset` replaces that choice with the preset's scheduler on the teacher's betas; the grid presets (lcm, tcd)
    keep the run's N and timestep scaling, so a consistency LoRA sampled with `tcd` walks the grid it trained on. A
    by-step-count preset (lcm-auto) starts on its rule for the table's first step count; `evaluate` re-resolves it at
    each step count from the row's `setup.saved`."""
    if preset is not None and get_preset(preset).by_steps:
        preset = resolve_preset(preset, setup.steps[0])[0]
    grid = (saved.config.original_inference_steps, saved.config.timestep_scaling) if hasattr(
        saved, "config") and "original_inference_steps" in saved.config else (setup.original_inference_steps, None)
    if preset is not None:
        scheduler = build_scheduler(preset, setup.base_config)
        if "original_inference_steps" in scheduler.config:
            settings = {"original_inference_steps": grid[0]} | ({"timestep_scaling": grid[1]} if grid[1] else {})
            scheduler = type(scheduler).from_config(scheduler.config, **settings)
        return scheduler
    if saved is not None and not isinstance(saved, LCMScheduler):
        return saved
    if saved is None:
        return lcm_scheduler_for(setup.base_config, setup.original_inference_steps)
    return lcm_scheduler_for(setup.base_config, *grid)


ROW_KINDS = {"teacher": _teacher_row, "lora": _lora_row, "lcd": _lcd_row}


def _row_plan(methods: Sequence[str], students: Mapping[str, str], lcd: Optional[str],
              named: Mapping[str, tuple] = {}) -> list[tuple[str, str, object]]:
    """(row name, row kind, its weights) per method, in order; an unknown name or a student without weights is an
    error before anything is sampled. A `named` student's weights are its (run, preset) pair."""
    kinds: dict[str, tuple[str, object]] = {name: ("teacher", None) for name in TEACHER_SOLVERS}
    kinds.update({name: ("lora", path) for name, path in students.items()})
    if lcd is not None:
        kinds["LCD"] = ("lcd", lcd)
    kinds.update({name: (student_kind(run), (run, preset)) for name, (run, preset) in named.items()})
    for name in methods:
        if name == "LCD" and lcd is None and name not in named:  # `--student LCD=RUN` is an ordinary student row
            raise ValueError("the LCD row needs --lcd (a train_lcd.py run folder or its UNet)")
        if name not in kinds:
            raise ValueError(f"unknown method {name!r}; valid: {[*TEACHER_SOLVERS, *STUDENTS, *students, *named]}")
    return [(name, *kinds[name]) for name in methods]


@contextlib.contextmanager
def _fused_student(pipe, path: Path):
    """The teacher with one LoRA student fused in (timed at full speed); afterwards the teacher's weights exactly.

    Unfusing subtracts the LoRA again in floating point, which leaves W + ΔW − ΔW ≠ W: the next student in the same
    table would be sampled on a slightly different teacher. The fused layers' base weights are restored bit for bit.
    """
    load_pipeline_lora(pipe, path, "student")
    saved = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".base_layer." in n}
    pipe.fuse_lora()
    try:
        yield
    finally:
        pipe.unfuse_lora()
        with torch.no_grad():
            for n, p in pipe.unet.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        pipe.unload_lora_weights()


def _expand_methods(methods: Sequence[str], students: Mapping[str, str], named: Mapping = {}) -> list[str]:
    """"LCM-LoRA" → every LoRA student's name, in order (an error when none was given), unless a `--student` row
    carries that name; other names unchanged."""
    out: list[str] = []
    for name in methods:
        if name == "LCM-LoRA" and "LCM-LoRA" not in students and name not in named:
            if not students:
                raise ValueError("the LCM-LoRA row needs --lora (a train_lcm_lora.py run folder or weights)")
            out.extend(n for n in students if n not in out)
        elif name not in out:
            out.append(name)
    return out


def _real_vs_real(held_out_feats: torch.Tensor, size: int) -> float:
    """Reference floor: Fréchet distance between the real train split and the held-out features already computed."""
    from .classifier import digit_features, frechet_distance
    from .digits import load_digits_tensors

    return frechet_distance(digit_features(load_digits_tensors("train", size=size)[0]), held_out_feats)


def _to_pil(x: torch.Tensor):
    from PIL import Image

    return Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


PROMPT_SET_TITLES = {"train": "Training caption templates",
                     "heldout": "Held-out prompts (templates no training caption uses)"}


def markdown_table(rows: Sequence[Row], real_vs_real: float, n: int) -> str:
    """Rows as markdown, one table per prompt set (a section each when there are several); lower FD is better."""
    lines = [f"{n} samples per cell; Fréchet distance on classifier features vs real held-out digits "
             f"(real train vs held-out: {real_vs_real:.1f}). Lower FD is better. Diversity: the mean pairwise "
             "feature distance within each prompted digit (a collapsed student scores low)."]
    sets = list(dict.fromkeys(r.prompts for r in rows))
    for prompt_set in sets:
        if len(sets) > 1:
            lines += ["", f"### {PROMPT_SET_TITLES.get(prompt_set, prompt_set)}"]
        lines += ["", "| method | steps | guidance_scale | accuracy | FD | diversity | ms / image |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r.prompts == prompt_set:
                lines.append(f"| {r.method} | {r.steps} | {r.guidance_scale:g} | {r.accuracy:.1%} | "
                             f"{r.frechet:.1f} | {r.diversity:.2f} | {r.sec_per_image * 1e3:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path) -> None:
    """Both metrics against steps, one line per method: the picture for choosing a step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for method, prompt_set in dict.fromkeys((r.method, r.prompts) for r in rows):
        rs = sorted((r for r in rows if (r.method, r.prompts) == (method, prompt_set)), key=lambda r: r.steps)
        # Held-out prompts dashed, in the legend by name; the training templates keep the plain method name.
        style = dict(marker="o", linestyle="--" if prompt_set != "train" else "-",
                     label=method if prompt_set == "train" else f"{method} ({prompt_set})")
        ax_fd.plot([r.steps for r in rs], [r.frechet for r in rs], **style)
        ax_acc.plot([r.steps for r in rs], [100 * r.accuracy for r in rs], **style)
    for ax, label in ((ax_fd, "Fréchet distance (lower is better)"), (ax_acc, "prompt accuracy (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_fd.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
