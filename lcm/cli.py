"""`lcm` command line: sample with a base model + LCM-LoRA or a full-LCD student, serve a live page, cache a
dataset's latents, run the demo, make data folders."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MINI_TEACHER = Path(__file__).resolve().parent / "assets" / "mini_teacher"
MINI_RUN_ROOT = Path("runs/mini")  # where `lcm demo` (the README's main job) writes, relative to the current folder
MINI_LORA_RUN = MINI_RUN_ROOT / "lcm-lora"
# Choice lists spelled out here so `lcm --help` does not import torch/diffusers; tests check they match the registries.
PRESET_NAMES = ("hyper", "lcm", "lcm-auto", "lightning", "lightning-1step", "pcm", "tcd", "tcd-mix-auto",
                "tcd-spread", "turbo")
EXPORT_FORMAT_NAMES = ("diffusers", "fused", "kohya")
EVAL_PROMPT_CHOICES = {"train": ("train",), "heldout": ("heldout",), "both": ("train", "heldout")}  # digits.PROMPT_SETS


def _lora_arg(value: str) -> tuple[str, float]:
    """`PATH` or `PATH:WEIGHT` (the weight after the last colon, so Windows-style paths still work)."""
    path, sep, weight = value.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return value, 1.0


def _student_arg(value: str) -> tuple[str | None, str]:
    """`lcm eval --lora`: `PATH` or `NAME=PATH` (a name holds no path separator, so `runs/a=b` stays a path)."""
    name, sep, path = value.partition("=")
    if sep and name and path and "/" not in name and "\\" not in name:
        return name, path
    return None, value


def _named_student_arg(value: str) -> tuple[str, str, str | None]:
    """`lcm eval --student NAME=RUN[:PRESET[@ETA]]` → (name, run, preset spec or None). A trailing `:word` is a preset
    only when it names one (`tcd`, or `tcd@0.5` for another eta), so a path holding a colon still works; a bad value
    is an argparse error."""
    from .presets import PRESETS, split_preset_spec

    name, sep, rest = value.partition("=")
    if not (sep and name and rest) or "/" in name or "\\" in name:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=RUN or NAME=RUN:PRESET")
    run, colon, preset = rest.rpartition(":")
    if colon and run and preset.partition("@")[0] in PRESETS:
        try:
            split_preset_spec(preset)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return name, run, preset
    return name, rest, None


def _with_preset_defaults(args, model_paths=()):
    """Fill --steps/--guidance/--eta/--height/--width left unset from the --preset table. With no --preset, the preset
    is the one the run behind the first LoRA / student in `model_paths` trained for (its config.yaml: a TCD-LoRA
    samples with tcd at its gamma, or tcd-mix-auto when it trained with a clean-end share, a Lightning LoRA with
    lightning, an LCM-LoRA with lcm-auto), else lcm; an explicit --preset always wins. A by-step-count preset
    (lcm-auto, tcd-mix-auto) stays unresolved here: see `_resolved`."""
    from .presets import RUN_SAMPLING, get_preset
    from .sampling import resolve_lora_dir, resolve_student_dir, saved_preset

    name, run_eta = getattr(args, "preset", None), None
    if name is None and model_paths:
        found = None
        for resolve in (resolve_lora_dir, resolve_student_dir):
            try:
                found = saved_preset(resolve(model_paths[0]))
                break
            except FileNotFoundError:
                continue
        if found is not None:
            name, run_eta, config = found
            name = RUN_SAMPLING.get(name, name)
            print(f"lcm: preset {name}" + (f" (eta {run_eta})" if run_eta is not None else "")
                  + f" from the run's {config}; --preset overrides", file=sys.stderr)
    name = name or "lcm"
    try:
        preset = get_preset(name)
    except ValueError as err:
        raise SystemExit(f"lcm sample: {err}") from err
    fill = {"steps": preset.steps, "guidance": preset.guidance, "eta": preset.eta if run_eta is None else run_eta,
            "height": preset.size, "width": preset.size, "init_image": None, "strength": None}
    unset = {k: v for k, v in fill.items() if getattr(args, k, None) is None}
    return argparse.Namespace(**{**vars(args), **unset, "preset": name})


def _resolved(args, command: str):
    """(preset, eta) to sample `args.steps` with: `args.preset` itself, or what a by-step-count preset picks (told)."""
    from .presets import resolve_preset

    preset, eta = resolve_preset(args.preset, args.steps, args.eta)
    if preset != args.preset:
        print(f"lcm {command}: {args.preset} at {args.steps} step(s) samples with {preset}"
              + (f" (eta {eta})" if eta is not None else ""), file=sys.stderr)
    return preset, eta


def _model_paths(args) -> list[str]:
    """The LoRA paths, then the student, that `lcm sample` was given (what the preset is inferred from)."""
    return [_lora_arg(v)[0] for v in args.lora or []] + ([args.student] if getattr(args, "student", None) else [])


def _student_kinds(args) -> list:
    """Each LoRA's / the student's `is_normal_cfg` from its model card (None when it has none, e.g. a hub LoRA)."""
    from .export import is_normal_cfg
    from .sampling import resolve_lora_dir, resolve_student_dir

    kinds = []
    for value in args.lora or []:
        try:
            folder = resolve_lora_dir(_lora_arg(value)[0])
            kinds.append(is_normal_cfg(folder if folder.is_dir() else folder.parent))
        except FileNotFoundError:
            kinds.append(None)
    if getattr(args, "student", None):
        try:
            kinds.append(is_normal_cfg(resolve_student_dir(args.student).parent))
        except FileNotFoundError:
            kinds.append(None)
    return kinds


def cmd_sample(args) -> int:
    from .sampling import (generate, image_grid, img2img_pipeline, img2img_steps, load_init_image,
                           load_pipeline_for_sampling, parse_seeds)

    args = _with_preset_defaults(args, _model_paths(args))
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("lcm sample: give at least one --prompt or a --prompts-file")
    if not 1 <= args.steps <= 50:
        raise SystemExit(f"lcm sample: --steps must be in [1, 50], got {args.steps}")
    init_image, strength = None, 1.0 if args.strength is None else args.strength
    if args.strength is not None and not args.init_image:
        raise SystemExit("lcm sample: --strength only applies with --init-image")
    if args.init_image:  # checked before any model is loaded
        try:
            img2img_steps(args.steps, strength)
        except ValueError as err:
            raise SystemExit(f"lcm sample: {err}") from err
        init_image = load_init_image(args.init_image, args.height, args.width)
    seeds = parse_seeds(args.seeds)
    preset, eta = _resolved(args, "sample")
    pipe = load_pipeline_for_sampling(args.base, [_lora_arg(v) for v in args.lora or []], fuse=args.fuse,
                                      device=args.device, dtype=args.dtype, preset=preset,
                                      student=args.student,
                                      config_dir=getattr(args, "config_dir", None))
    if init_image is not None:
        pipe = img2img_pipeline(pipe)
    images = generate(pipe, prompts, seeds, args.steps, args.guidance, args.height, args.width, args.negative_prompt,
                      eta=eta, init_image=init_image, strength=strength, normal_cfg=_student_kinds(args))
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, len(seeds)).save(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        jobs = [(p, s) for p in range(len(prompts)) for s in seeds]
        for (p, s), im in zip(jobs, images):
            im.save(out / f"prompt{p:02d}_seed{s}.png")
    print(f"wrote {len(images)} image(s) to {out}")
    return 0


def default_model(base: str | None, loras: list[tuple[str, float]]) -> tuple[str, list[tuple[str, float]]]:
    """`lcm serve` with no --base: the mini teacher, plus the LoRA `lcm demo` distilled from it when there is one.

    Without that LoRA the page serves the teacher alone (and says how to make the LoRA) rather than refusing to start.
    """
    if base is not None:
        return base, loras
    if not loras:
        if (MINI_LORA_RUN / "final" / "pytorch_lora_weights.safetensors").is_file():
            loras = [(str(MINI_LORA_RUN), 1.0)]
        else:
            print(f"lcm serve: no LoRA at {MINI_LORA_RUN}/final (relative to this folder). `lcm demo` (or `bash run.sh`)"
                  " distils one from the mini teacher in about 10 minutes on 2 CPU cores; `--lora PATH` uses another."
                  " Serving the mini teacher alone for now: without the LoRA, few-step images are blurry.")
    return str(MINI_TEACHER), loras


def cmd_serve(args) -> int:
    """The live page: the image follows the prompt as you type (see lcm/serve.py)."""
    from .serve import host_warning, serve

    base, loras = default_model(args.base, [_lora_arg(v) for v in args.lora or []])
    args = _with_preset_defaults(args, [path for path, _ in loras])
    if not 1 <= args.steps <= 8:
        raise SystemExit(f"lcm serve: --steps must be in [1, 8] (the page's range), got {args.steps}")
    if warning := host_warning(args.host):
        print(warning, file=sys.stderr)
    serve(base, loras, args.preset, args.steps, args.guidance, args.eta, args.height, args.width, host=args.host,
          port=args.port, teacher_steps=args.teacher_steps, teacher_guidance=args.teacher_guidance,
          device=args.device, dtype=args.dtype, config_dir=args.config_dir)
    return 0


def cmd_export(args) -> int:
    """Rewrite a finished run's LoRA for other tools: diffusers (a copy), kohya keys, or a fused UNet."""
    from .export import export_run

    path = export_run(args.run, args.format, args.out, base=args.base)
    print(f"wrote {args.format} export to {path}")
    return 0


def cmd_cache(args) -> int:
    """Encode the config's dataset once (VAE posterior moments + text conditioning) into `data.cache_dir`."""
    from accelerate import PartialState

    from .cache import build_cache
    from .config import ConfigError, LCDConfig, LCMLoraConfig, load_config

    errors = []
    for schema in (LCMLoraConfig, LCDConfig):  # a LoRA or a full-distillation config: both have model + data
        try:
            cfg = load_config(args.config, args.overrides, schema=schema)
            break
        except ConfigError as err:
            errors.append(err)
    else:
        raise errors[0]  # a ConfigError: one line and exit status 2 from the `lcm` command
    report = build_cache(cfg, batch_size=args.batch_size, device=args.device, shard_mb=args.shard_mb)
    if PartialState().is_main_process:  # under `accelerate launch`, every process returns the same report
        print(report)
    return 0


def _train(config: str, overrides: list[str], script: str = "train_lcm_lora.py") -> None:
    """Run a training script in a child process, exactly as a user would."""
    subprocess.run([sys.executable, str(REPO / script), "--config", config, *overrides], check=True)


def _sample_grid(base: str, lora: str, prompts: list[str], out: Path, size: int) -> None:
    cmd_sample(argparse.Namespace(base=base, lora=[lora], student=None, prompt=prompts, prompts_file=None,
                                  seeds="0-7", steps=4, guidance=1.0, height=size, width=size, out=str(out),
                                  fuse=True, device=None, dtype=None, negative_prompt=None))


def _step_counter(total: int):
    """A callable returning "[1/total]", "[2/total]", … on successive calls: the demo's progress labels."""
    count = iter(range(1, total + 1))
    return lambda: f"[{next(count)}/{total}]"


def cmd_demo(args) -> int:
    """The README's main job: digits folder → LCM-LoRA from the shipped mini teacher → 4-step grid → quality table.

    `--tiny` runs the same path on a tiny random-weight SDXL teacher and generated shapes (a fast smoke run).
    """
    root = Path(args.root or ("runs/demo" if args.tiny else MINI_RUN_ROOT))
    run = root / MINI_LORA_RUN.name
    if args.tiny:
        from .tiny import make_captioned_image_folder, save_tiny_pipeline

        teacher, data = root / "teacher", root / "data"
        if not (teacher / "model_index.json").is_file():
            print(f"[1/3] building a tiny SDXL-architecture teacher in {teacher}")
            save_tiny_pipeline("sdxl", teacher)
        if not data.is_dir():
            make_captioned_image_folder(data, n=16, size=32)
        print(f"[2/3] distilling LCM-LoRA into {run}")
        _train("demo_lcm_lora", [f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={run}",
                                 *args.overrides])
        print(f"[3/3] sampling 4 steps with the LoRA into {root / 'grid.png'}")
        _sample_grid(str(teacher), str(run), ["a red circle", "a blue square"], root / "grid.png", 32)
        return 0

    from .digits import export_digits_folder, prompt_for

    teacher, data = str(MINI_TEACHER), root / "digits"
    lcd = root / "lcd" if args.lcd else None
    step = _step_counter(5 if lcd else 4)
    if not (data / "metadata.jsonl").is_file():
        print(f"{step()} writing the digits as a captioned image folder to {data}")
        export_digits_folder(data)
    else:
        print(f"{step()} using the digits folder already at {data}")
    print(f"{step()} distilling LCM-LoRA from the mini teacher into {run}")
    _train("mini_lcm_lora", [f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={run}",
                             *args.overrides])
    if lcd:
        print(f"{step()} full LCD (the whole UNet, with a guidance embedding) from the mini teacher into {lcd}")
        _train("mini_lcd", [f"model.pretrained={teacher}", f"data.path={data}", f"train.output_dir={lcd}",
                            *args.overrides], script="train_lcd.py")
    print(f"{step()} sampling 4 steps with the LoRA into {root / 'grid.png'} (a row per digit, a column per seed)")
    _sample_grid(teacher, str(run), [prompt_for(d) for d in range(10)], root / "grid.png", 16)
    print(f"{step()} the few-step quality table ({args.eval_n} samples per cell) into {root / 'eval'}")
    return cmd_eval(argparse.Namespace(teacher=teacher, lora=[str(run)], lcd=str(lcd) if lcd else None,
                                       out=str(root / "eval"), n=args.eval_n, steps="1,2,4,8",
                                       teacher_w=args.teacher_w, guidance=1.0, methods=None))


def cmd_data(args) -> int:
    """Write a built-in data set as an ordinary captioned image folder (what a user brings)."""
    from .digits import export_digits_folder

    out = export_digits_folder(args.out, size=args.size, split=args.split, seed=args.seed)
    n = sum(1 for _ in out.glob("*.png"))
    print(f"wrote {n} images + metadata.jsonl to {out}")
    return 0


def cmd_eval(args) -> int:
    """The few-step quality table: teacher solvers vs the distilled students (each --lora its own rows)."""
    from .evaluate import evaluate

    steps = [int(s) for s in args.steps.split(",")]
    loras = [_student_arg(v) for v in args.lora] if args.lora else None
    evaluate(args.teacher, loras, args.out, n=args.n, steps=steps, teacher_w=args.teacher_w,
             student_guidance=args.guidance, methods=args.methods.split(",") if args.methods else None, lcd=args.lcd,
             prompt_sets=EVAL_PROMPT_CHOICES[getattr(args, "prompts", "train")],
             config_dir=getattr(args, "config_dir", None),  # `lcm demo` calls with neither
             students=getattr(args, "student", None) or ())
    print((Path(args.out) / "table.md").read_text())
    return 0


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The model and sampling options `sample` and `serve` share (what `load_pipeline_for_sampling` takes)."""
    p.add_argument("--lora", action="append", help="LoRA run folder / weights folder / .safetensors, optional :WEIGHT;"
                   " repeat to stack")
    p.add_argument("--preset", default=None, choices=sorted(PRESET_NAMES),
                   help="scheduler + default steps/guidance/eta for the weights' family (default: the one the first "
                   "LoRA's / student's run trained for, read from its config.yaml, with lcm-auto for an LCM-LoRA: "
                   "LCMScheduler at 1-3 steps, TCDScheduler above; lcm when there is no run config)")
    p.add_argument("--steps", type=int, default=None, help="default: the preset's (lcm: 4)")
    p.add_argument("--guidance", type=float, default=None,
                   help="diffusers guidance_scale (= LCM w + 1); default: the preset's (lcm: 1.0; 1.0–2.0 suits "
                   "LCM-LoRA)")
    p.add_argument("--height", type=int, default=None, help="default: the preset's size, else the model's")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, …")
    p.add_argument("--dtype", default=None, help="auto (default: cuda → bf16/fp16, cpu → fp32), fp32, fp16, bf16")
    _add_config_dir_arg(p)


def _add_config_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", default=None, help="with a single-file --base/--teacher (model.safetensors): a "
                   "diffusers-layout folder with its configs and tokenizers (default: beside the file, or a shipped "
                   "reference of the same architecture)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcm", description="Latent consistency distillation toolkit.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate images in a few steps with LCMScheduler (+ LoRA)")
    s.add_argument("--base", required=True, help="base pipeline: a local diffusers folder, a hub id, or a single-file "
                   "checkpoint (model.safetensors; see --config-dir)")
    _add_pipeline_args(s)
    s.add_argument("--student", default=None, help="a full-LCD student (train_lcd.py run folder): replaces the base's "
                   "UNet/transformer; for a UNet with a guidance embedding, --guidance = w + 1")
    s.add_argument("--prompt", action="append", help="repeatable")
    s.add_argument("--prompts-file", help="one prompt per line")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--eta", type=float, default=None, help="stochasticity passed to the pipeline (tcd: gamma, 0.3)")
    s.add_argument("--init-image", default=None, help="image-to-image: start from this picture")
    s.add_argument("--strength", type=float, default=None,
                   help="img2img noise level in (0, 1]; int(steps × strength) steps run (default 1.0)")
    s.add_argument("--seeds", default="0-3", help="e.g. 0-7 or 1,5,9; one generator per image")
    s.add_argument("--out", default="samples.png", help="a .png path (grid: prompts × seeds) or a folder")
    s.add_argument("--fuse", action="store_true", help="fuse the LoRA into the UNet before sampling")
    s.set_defaults(func=cmd_sample)

    v = sub.add_parser("serve", help="a local web page whose image follows the prompt as you type")
    v.add_argument("--base", default=None, help="base pipeline (default: the shipped mini teacher, with the LoRA "
                   f"`lcm demo` writes to {MINI_LORA_RUN} when it exists)")
    _add_pipeline_args(v)
    v.add_argument("--teacher-steps", type=int, default=25, help="compare mode: the teacher's steps (default 25)")
    v.add_argument("--teacher-guidance", type=float, default=1.5,
                   help="compare mode: the teacher's guidance_scale (default 1.5, the mini teacher's best; SDXL: 5–8)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=7860)
    v.set_defaults(func=cmd_serve, eta=None)

    x = sub.add_parser("export", help="write a finished run's LoRA as diffusers, kohya (ComfyUI/A1111) or fused UNet")
    x.add_argument("run", help="training run folder (holds final/ and config.yaml)")
    x.add_argument("--format", required=True, choices=sorted(EXPORT_FORMAT_NAMES),
                   help="diffusers: a copy of final/; kohya: lora_unet_… keys + .alpha; fused: the UNet with the "
                   "LoRA merged in")
    x.add_argument("--out", default=None, help="output folder (default RUN/export/FORMAT)")
    x.add_argument("--base", default=None, help="base model (default: model.pretrained from RUN/config.yaml)")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("cache", help="encode a dataset once into a latent + text-embedding cache (data.cache_dir)")
    c.add_argument("--config", required=True, help="the training config (YAML file or preset name)")
    c.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
    c.add_argument("--device", default=None, help="one process only; default: accelerate's device (cuda if "
                   "available, else cpu; under `accelerate launch`, each process's own)")
    c.add_argument("--shard-mb", type=float, default=1024.0, help="approximate size of each safetensors shard")
    c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.cache_dir=runs/cache")
    c.set_defaults(func=cmd_cache)

    dd = sub.add_parser("data", help="write a built-in data set as a captioned image folder")
    dd.add_argument("name", choices=["digits"], help="digits: scikit-learn's handwritten digits with captions")
    dd.add_argument("--out", required=True)
    dd.add_argument("--size", type=int, default=16, help="image size in pixels (RGB, square)")
    dd.add_argument("--split", default="train", choices=["train", "held_out", "all"])
    dd.add_argument("--seed", type=int, default=0, help="seed for drawing caption templates")
    dd.set_defaults(func=cmd_data)

    e = sub.add_parser("eval", help="few-step quality table: teacher DDIM/DPM-Solver++/Euler vs LCM student")
    e.add_argument("--teacher", default=str(MINI_TEACHER), help="teacher pipeline folder or single-file checkpoint "
                   "(default: the mini teacher)")
    e.add_argument("--lora", action="append", default=None,
                   help="a distilled LCM-LoRA (run folder or weights), optionally NAME=PATH; repeat to compare several "
                   "students in one table (rows named NAME, else by folder; a single unnamed one is 'LCM-LoRA')")
    e.add_argument("--lcd", default=None, help="the full-LCD student (train_lcd.py run folder or its UNet); sampled at "
                   "guidance_scale = teacher w + 1 through its guidance embedding")
    e.add_argument("--student", action="append", default=None, type=_named_student_arg, metavar="NAME=RUN[:PRESET[@ETA]]",
                   help="any distilled student, repeatable: a LoRA or whole-network run folder (the kind is read from "
                   "its files), its row named NAME; :PRESET (lcm, lcm-auto, tcd, turbo, lightning, …) samples it "
                   "with that preset's scheduler instead of the one its run saved; @ETA sets the sampler's eta "
                   "(tcd@0.5: TCD's gamma 0.5)")
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--n", type=int, default=500, help="samples per cell")
    e.add_argument("--steps", default="1,2,4,8")
    e.add_argument("--teacher-w", type=float, default=0.5, help="teacher CFG w (LCM convention; guidance_scale = w + 1)")
    e.add_argument("--guidance", type=float, default=1.0, help="student guidance_scale")
    e.add_argument("--prompts", default="train", choices=sorted(EVAL_PROMPT_CHOICES),
                   help="prompt text: train (the training caption templates, default), heldout (templates no "
                   "training caption uses) or both (a table section each)")
    _add_config_dir_arg(e)
    e.add_argument("--methods", default=None,
                   help="comma list of DDIM,DPM-Solver++,Euler,Euler ancestral,LCM-LoRA,LCD or student names; "
                   "LCM-LoRA means every --lora (default: DDIM, DPM-Solver++, Euler and every student given; Euler "
                   "ancestral, the teacher's stochastic sampler, only by name)")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="the main job: digits → LCM-LoRA and full LCD from the mini teacher → grid → "
                       "quality table")
    d.add_argument("--root", default=None, help="output folder (default runs/mini, or runs/demo with --tiny)")
    d.add_argument("--tiny", action="store_true", help="tiny random-weight teacher and shapes: a fast smoke run")
    d.add_argument("--lcd", action=argparse.BooleanOptionalAction, default=True,
                   help="also distil the whole UNet (full LCD, configs/mini_lcd.yaml, ~8 minutes) and add its row to "
                   "the table (default on; --no-lcd skips it)")
    d.add_argument("--eval-n", type=int, default=500, help="samples per cell of the quality table")
    d.add_argument("--teacher-w", type=float, default=0.5, help="teacher CFG w for the table's baselines (the mini teacher's best FD)")
    d.add_argument("overrides", nargs="*", help="dotted config overrides for the training run(s)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    """Run one `lcm` command in this process; errors propagate (tests and callers see the exception)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry(argv=None) -> int:
    """The `lcm` console command: a user error (bad config, data, model, LoRA, full disk) prints one line and exits 2;
    a bug keeps its traceback (LCM_DEBUG=1 shows it for user errors too)."""
    from .errors import exit_on_user_error

    return exit_on_user_error(lambda: main(argv), prog="lcm")


if __name__ == "__main__":
    sys.exit(entry())
