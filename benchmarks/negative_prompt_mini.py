"""Does a negative prompt work? The share of sevens among samples for the prompt "a handwritten digit", with and
without the negative prompt "the number 7" (issue #17), on the mini teacher, and the same for a prompt that makes
sevens common ("a handwritten digit seven or one": the mini teacher draws ~70% sevens for it unguided, while "a
handwritten digit" gives ~6%, so only the second can show a large drop):

    python -m benchmarks.negative_prompt_mini --ncfg runs/mini/ncfg-lora [--lcm runs/mini/lcm-lora] [--n 500]

Rows: the teacher (DDIM, 25 steps, trailing) at each guidance; a normal-CFG LoRA (`distill.teacher_cfg=false`) at
--steps and each guidance; an LCM-LoRA (guidance distilled in) at guidance 1 and 2. Every row uses the same seeds, one
generator per image; digits are read by the shipped classifier. Writes results/negative_prompt_mini.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS, NEGATIVE = ("a handwritten digit", "a handwritten digit seven or one"), "the number 7"


def digit_shares(pipe, prompt: str, n: int, steps: int, guidance: float, negative: str | None) -> list[float]:
    """Share of each digit 0–9 among n samples of `prompt` (seeds 0 … n − 1)."""
    from lcm.classifier import classify
    from lcm.evaluate import sample_tensors

    kwargs = {"negative_prompt": negative} if negative else {}  # one string: the pipeline repeats it per prompt
    images, _ = sample_tensors(pipe, [prompt] * n, list(range(n)), steps, guidance, **kwargs)
    counts = torch.bincount(classify(images), minlength=10).float()
    return (counts / n).tolist()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ncfg", required=True, help="a normal-CFG LoRA run")
    p.add_argument("--lcm", default=None, help="an LCM-LoRA run, for contrast")
    p.add_argument("--n", type=int, default=500, help="samples per cell")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", default="3,4,5")
    p.add_argument("--prompt", action="append", default=None, help=f"repeatable; default: {list(PROMPTS)}")
    args = p.parse_args(argv)
    from diffusers import StableDiffusionXLPipeline

    from lcm.cli import MINI_TEACHER
    from lcm.evaluate import TEACHER_SOLVERS
    from lcm.sampling import load_pipeline_for_sampling

    guidances = [float(g) for g in args.guidance.split(",")]
    prompts = args.prompt or list(PROMPTS)
    rows = []

    def run(name, pipe, steps, guidance):
        pipe.set_progress_bar_config(disable=True)
        for prompt in prompts:
            for negative in (None, NEGATIVE):
                shares = digit_shares(pipe, prompt, args.n, steps, guidance, negative)
                rows.append({"row": name, "prompt": prompt, "steps": steps, "guidance_scale": guidance,
                             "negative_prompt": negative, "share_7": shares[7], "shares": shares})
                print(f"{name:>12} {prompt!r} {steps} steps g {guidance}  negative {negative!r:>16}  sevens "
                      f"{shares[7]:6.1%}", flush=True)

    teacher = StableDiffusionXLPipeline.from_pretrained(MINI_TEACHER)
    teacher.scheduler = TEACHER_SOLVERS["DDIM"](teacher.scheduler.config)
    for g in guidances:
        run("teacher DDIM", teacher, 25, g)
    ncfg = load_pipeline_for_sampling(str(MINI_TEACHER), [(args.ncfg, 1.0)], fuse=True, device="cpu", dtype="fp32")
    for g in guidances:
        run("normal-CFG", ncfg, args.steps, g)
    if args.lcm:
        lcm = load_pipeline_for_sampling(str(MINI_TEACHER), [(args.lcm, 1.0)], fuse=True, device="cpu", dtype="fp32")
        for g in (1.0, 2.0):
            run("LCM-LoRA", lcm, args.steps, g)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    meta = {"prompts": prompts, "negative_prompt": NEGATIVE, "n": args.n, "ncfg": args.ncfg, "lcm": args.lcm,
            "commit": commit.strip(), "torch_threads": torch.get_num_threads()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "negative_prompt_mini.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = ["## Negative prompt on the mini teacher: share of sevens", "",
             f"`python -m benchmarks.negative_prompt_mini`; {args.n} samples per cell, commit {meta['commit']}, "
             f"negative prompt {NEGATIVE!r}.", "",
             "| row | prompt | steps | guidance_scale | sevens without | sevens with the negative prompt |",
             "|---|---|---|---|---|---|"]
    for a, b in zip(rows[::2], rows[1::2]):
        lines.append(f"| {a['row']} | {a['prompt']} | {a['steps']} | {a['guidance_scale']} | {a['share_7']:.1%} | "
                     f"{b['share_7']:.1%} |")
    (RESULTS / "negative_prompt_mini.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
