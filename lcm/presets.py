"""Sampling presets: which scheduler (and settings, steps, guidance) each family of few-step weights expects.

Every preset rebuilds its scheduler from the base model's own scheduler config (its betas and prediction type), then
applies the preset's settings on top. `guidance` is diffusers' `guidance_scale` (= LCM w + 1); values ≤ 1 run no
unconditional branch, which is what the guidance-distilled families (Lightning, Turbo, Hyper-SD) were trained for.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Optional

from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)


def spread_timesteps(num_train_timesteps: int, grid_steps: int, steps: int) -> list[int]:
    """`steps` timesteps spread evenly, by index, over the whole trained grid of `grid_steps` points c·i − 1
    (c = T // N, i = 1 … N): from its top down to its lowest point, each index rounded half up. TCDScheduler's own
    choice takes every (N / steps)-th point from the top and stops short of the low end: 8 steps on the 25-point grid
    end at t = 159, spread ones at 39 (999, 879, 719, 599, 439, 319, 159, 39)."""
    if not 1 <= steps <= grid_steps:
        raise ValueError(f"spread timesteps: steps must be in [1, {grid_steps}] (the grid's size), got {steps}")
    c = num_train_timesteps // grid_steps
    if steps == 1:
        return [grid_steps * c - 1]
    top = grid_steps - 1
    return [c * (math.floor(top * (1 - j / (steps - 1)) + 0.5) + 1) - 1 for j in range(steps)]


class SpreadTCDScheduler(TCDScheduler):
    """diffusers' TCDScheduler, walking `spread_timesteps` on its grid (`original_inference_steps`) when a pipeline
    asks for a step count: the same as passing that list as `timesteps=` to a stock pipeline holding TCDScheduler, which
    is what a model card tells users to do. Custom timesteps, another `original_inference_steps` and img2img strengths
    below 1 keep TCDScheduler's own behaviour."""

    def set_timesteps(self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None,
                      strength: float = 1.0) -> None:
        if num_inference_steps is not None and timesteps is None and original_inference_steps is None and strength == 1:
            timesteps = spread_timesteps(self.config.num_train_timesteps, self.config.original_inference_steps,
                                         num_inference_steps)
            num_inference_steps = None
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device,
                              original_inference_steps=original_inference_steps, timesteps=timesteps, strength=strength)


@dataclass(frozen=True)
class SamplingPreset:
    """A scheduler class, the config values it needs, and the sampling defaults that go with it."""

    scheduler: type
    settings: dict = field(default_factory=dict)
    steps: int = 4
    guidance: float = 1.0
    eta: Optional[float] = None  # passed to the pipeline call (not the scheduler): see the TCD entry
    size: Optional[int] = None  # default image side in pixels; None = the pipeline's own default
    note: str = ""
    # A preset that picks its sampler by step count: (max steps or None for "any more", preset, eta) rules, first
    # match wins (`resolve_preset`). Empty: one sampler at every step count.
    by_steps: tuple = ()


PRESETS: dict[str, SamplingPreset] = {
    # clip_sample off: clipping x̂₀ to [-1, 1] is meant for pixel-space models and wrecks latents.
    "lcm": SamplingPreset(LCMScheduler, {"clip_sample": False}, steps=4, guidance=1.0,
                          note="LCM / LCM-LoRA (arXiv:2310.04378, 2311.05556)"),
    # TCD's stochasticity gamma is the `eta` of TCDScheduler.step. The pipelines forward their own `eta` argument
    # (default 0.0) to step(), which silently overrides the scheduler's default 0.3: so it is passed explicitly.
    "tcd": SamplingPreset(TCDScheduler, {"clip_sample": False}, steps=4, guidance=1.0, eta=0.3,
                          note="Trajectory Consistency Distillation (arXiv:2402.19159); eta = gamma"),
    # The same sampler on timesteps spread over the whole grid, down to its lowest point (`spread_timesteps`).
    "tcd-spread": SamplingPreset(SpreadTCDScheduler, {"clip_sample": False}, steps=8, guidance=1.0, eta=0.7,
                                 note="TCD on timesteps spread evenly over the whole trained grid; eta = gamma"),
    # An LCM-LoRA sampled by step count (issue #13): LCMScheduler re-noises its x̂₀ fully at every step. That is best
    # at 1–3 steps, but each extra step passes the sample through the student's bias once more, so 8 steps score worse
    # than 4 (benchmarks/schedule_mini.py: the count of passes, not the low timesteps). From 4 steps on, TCDScheduler on
    # the same grid keeps part of the sample (gamma < 1). Rule chosen on 3 LoRA seeds, checked on 2 fresh ones and on
    # LCD (benchmarks/results/sampler_{steps,auto,lcd}_mini.md). From 7 steps TCD's own stride stops short of the
    # grid's low end (8 of 25 points end at t = 159); spreading the steps down to the lowest point takes the 8-step FD
    # from 32.1-33.7 to 29.9-30.9 (benchmarks/results/sampler_spread_mini.md).
    "lcm-auto": SamplingPreset(LCMScheduler, {"clip_sample": False}, steps=4, guidance=1.0,
                               by_steps=((3, "lcm", None), (6, "tcd", 0.8), (None, "tcd-spread", 0.7)),
                               note="LCM-LoRA / LCD: LCMScheduler at 1-3 steps, TCDScheduler above "
                                    "(eta 0.8; 0.7 from 7, on timesteps spread over the whole grid)"),
    # A TCD-LoRA trained with distill.tcd_clean_share > 0 (a share of LCD's clean-end rows): LCMScheduler is its best
    # sampler at 1–2 steps (its clean-end rows train exactly that prediction), TCD with less stochasticity as the
    # steps grow; rule read off seed 0, scored unchanged on seeds 1–4 (benchmarks/results/sampler_tcdmix_mini.md).
    # From 7 steps on spread timesteps, as lcm-auto: 8-step FD 29.5 against 31.7 (sampler_spread_tcdmix_mini.md).
    "tcd-mix-auto": SamplingPreset(LCMScheduler, {"clip_sample": False}, steps=4, guidance=1.0,
                                   by_steps=((2, "lcm", None), (4, "tcd", 0.7), (6, "tcd", 0.5),
                                             (None, "tcd-spread", 0.5)),
                                   note="TCD-LoRA with a clean-end share: LCMScheduler at 1-2 steps, TCDScheduler "
                                        "above (eta 0.7; 0.5 from 5, on spread timesteps from 7)"),
    # PCM's deterministic phase-by-phase sampler: DDIM trailing at M steps walks the phase edges (lcm/trajectory.py).
    "pcm": SamplingPreset(DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False,
                                          "set_alpha_to_one": True}, steps=4, guidance=1.0,
                          note="Phased Consistency (arXiv:2405.18407); steps = the phases trained"),
    "lightning": SamplingPreset(EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, steps=4, guidance=0.0,
                                note="SDXL-Lightning 2/4/8-step (arXiv:2402.13929), no CFG"),
    # The 1-step Lightning UNet predicts x0 directly, so the scheduler must read its output as a sample.
    "lightning-1step": SamplingPreset(EulerDiscreteScheduler, {"timestep_spacing": "trailing",
                                                               "prediction_type": "sample"}, steps=1, guidance=0.0,
                                      note="SDXL-Lightning 1-step checkpoint (x0 prediction), no CFG"),
    "turbo": SamplingPreset(EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, steps=1, guidance=0.0,
                            size=512, note="SDXL-Turbo (ADD, arXiv:2311.17042), trained at 512 px, no CFG"),
    "hyper": SamplingPreset(DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False}, steps=4,
                            guidance=0.0, note="Hyper-SD LoRAs (arXiv:2404.13686), no CFG"),
}


# The preset `lcm sample` / `lcm serve` use for a run whose training validated with the key's preset: an LCM-LoRA (or
# LCD student) is sampled by step count. `--preset lcm` still gives LCMScheduler at every step count.
RUN_SAMPLING = {"lcm": "lcm-auto"}


def get_preset(name: str) -> SamplingPreset:
    """The preset called `name`; an unknown name is an error listing the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]


def resolve_preset(name: str, steps: int, eta: Optional[float] = None) -> tuple[str, Optional[float]]:
    """(preset, eta) that preset `name` samples with at `steps`: itself and `eta` (else its own eta) for a one-sampler
    preset; for a by-step-count preset (`lcm-auto`) the first rule that covers `steps`. An explicit `eta` replaces the
    rule's eta where the rule's sampler takes one (TCD's gamma), and is dropped where it does not (LCMScheduler)."""
    preset = get_preset(name)
    if not preset.by_steps:
        return name, preset.eta if eta is None else eta
    if steps < 1:
        raise ValueError(f"preset {name!r}: steps must be ≥ 1, got {steps}")
    for max_steps, rule, rule_eta in preset.by_steps:
        if max_steps is None or steps <= max_steps:
            return rule, (None if rule_eta is None else (rule_eta if eta is None else eta))
    raise ValueError(f"preset {name!r} has no sampler for {steps} steps")  # a table that ends with a bound


def stock_eta(name: str, steps: int) -> Optional[float]:
    """The `eta` a stock pipeline holding TCDScheduler (on the run's grid) is called with to follow preset `name` at
    `steps`: the TCD rule's eta, or 1.0 where the rule is LCMScheduler. TCD at eta 1 jumps to s = 0 and re-noises fully,
    as LCMScheduler does; they differ only in the last point (TCD's t = 0 against LCMScheduler's boundary scalings):
    equal FD at 2 steps, 1.4 worse at 1 step on the clean-share TCD-LoRA (benchmarks/results/sampler_tcd_eta1_mini.md).
    None where the rule's sampler is neither."""
    rule, eta = resolve_preset(name, steps)
    return {"lcm": 1.0, "tcd": eta, "tcd-spread": eta}.get(rule)


def stock_timesteps(name: str, steps: int, grid_steps: int, num_train_timesteps: int = 1000) -> Optional[list[int]]:
    """The `timesteps=` a stock pipeline holding TCDScheduler on a grid of `grid_steps` points is called with to follow
    preset `name` at `steps` (with `stock_eta`): the spread list where the rule is `tcd-spread`, else None (the
    scheduler's own choice)."""
    rule, _ = resolve_preset(name, steps)
    return spread_timesteps(num_train_timesteps, grid_steps, steps) if rule == "tcd-spread" else None


def rule_spans(name: str) -> list[tuple[int, str, str, Optional[float]]]:
    """A by-step-count preset's table in words: (fewest steps, span, rule, eta) per rule, e.g. (3, "at 3–4 steps",
    "tcd", 0.7)."""
    spans, low = [], 1
    for max_steps, rule, eta in get_preset(name).by_steps:
        spans.append((low, _span_words(low, max_steps), rule, eta))
        low = (max_steps or low) + 1
    return spans


def _span_words(low: int, last: Optional[int]) -> str:
    """"from 5 steps", "at 1 step", "at 3–4 steps": the step counts low … last (None: no end)."""
    return (f"from {low} steps" if last is None else f"at {low} step{'s' * (low > 1)}" if last == low
            else f"at {low}–{last} steps")


def rule_text(name: str) -> str:
    """The samplers a by-step-count preset picks, in words: "LCMScheduler at 1–2 steps, TCDScheduler eta 0.7 at 3–4
    steps, TCDScheduler eta 0.5 from 5 steps" for tcd-mix-auto."""
    return ", ".join(f"{_scheduler_words(rule)}{'' if eta is None else f' eta {eta}'} {span}"
                     for _, span, rule, eta in rule_spans(name))


def _scheduler_words(preset: str) -> str:
    """A preset's scheduler as a user sets it up in diffusers: the spread TCD is the stock TCDScheduler on a list."""
    cls = get_preset(preset).scheduler
    return "TCDScheduler on spread timesteps" if cls is SpreadTCDScheduler else cls.__name__


def stock_eta_text(name: str) -> str:
    """`stock_eta`'s rule in words: "1.0 at 1–2 steps, 0.7 at 3–4 steps, 0.5 from 5 steps" for tcd-mix-auto (spans
    with the same eta said once; where the timesteps change, `spread_text` says so)."""
    merged: list[list] = []  # [first, last or None, eta]
    for (max_steps, _, _), (low, _, _, _) in zip(get_preset(name).by_steps, rule_spans(name)):
        eta = stock_eta(name, low)
        if merged and merged[-1][2] == eta:
            merged[-1][1] = max_steps
        else:
            merged.append([low, max_steps, eta])
    return ", ".join(f"{eta} {_span_words(low, last)}" for low, last, eta in merged)


def spread_text(name: str, grid_steps: int, num_train_timesteps: int = 1000) -> str:
    """Where preset `name` spreads its timesteps, as an instruction for a stock pipeline with the list at 8 steps (or
    the first such step count) on a grid of `grid_steps` points; "" where it never does or the grid is too short."""
    first = next((low for low, _, rule, _ in rule_spans(name) if rule == "tcd-spread"), None)
    if first is None or first > grid_steps:
        return ""
    at = min(max(8, first), grid_steps)
    return (f"From {first} steps also pass `timesteps=`, spread evenly over the grid down to its lowest point: at {at} "
            f"steps `timesteps={stock_timesteps(name, at, grid_steps, num_train_timesteps)}`.")


def split_preset_spec(spec: str) -> tuple[str, Optional[float]]:
    """`PRESET[@ETA]` → (preset name, eta or None): `tcd@0.5` samples with the tcd preset at eta (TCD's gamma) 0.5.
    An unknown preset, or an eta that is not a number in [0, 1], is an error naming the spec."""
    name, at, eta = spec.partition("@")
    get_preset(name)
    if not at:
        return name, None
    try:
        value = float(eta)
    except ValueError:
        raise ValueError(f"preset {spec!r}: the part after @ must be a number (the sampler's eta)") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"preset {spec!r}: eta must be in [0, 1], got {value}")
    return name, value


def build_scheduler(name: str, base_config):
    """The preset's scheduler on the base model's betas: `base_config` keys the class accepts, then the settings. A
    by-step-count preset has no one scheduler: `resolve_preset` it at the step count first."""
    preset = get_preset(name)
    if preset.by_steps:
        raise ValueError(f"preset {name!r} picks its scheduler by step count: resolve_preset({name!r}, steps) first")
    # Keep only what the class understands: a teacher's Euler-only keys (or an LCM config's `original_inference_steps`
    # given to Euler) would otherwise be stored as unused config and warned about.
    accepted = set(inspect.signature(preset.scheduler.__init__).parameters) - {"self"}
    config = {k: v for k, v in dict(base_config).items() if k in accepted}
    return preset.scheduler(**{**config, **preset.settings})
