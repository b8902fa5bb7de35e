"""scikit-learn's handwritten digits as a tiny text-to-image data set: the mini teacher's data (DESIGN.md §4).

`sklearn.datasets.load_digits` ships 1,797 8×8 grey images (ink = high values, 0–16) inside the package, so no
download is needed. We split them once, deterministically and stratified by class, into a train split (the teacher and
the classifier learn from it) and a held-out split (the classifier's accuracy and the real-vs-real Fréchet reference),
upscale them bilinearly to a small RGB size (16 px by default: the VAE turns that into 8×8×4 latents), and caption them
from varied templates ("a handwritten digit seven", "the number 7, handwritten", …).

`export_digits_folder` writes the same data as an ordinary image folder + `metadata.jsonl` — exactly what a user brings
to `lcm data` / the image-folder loader, so the custom-data path is exercised end to end.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w} = number word, {d} = numeral. Varied on purpose: the teacher must learn that "seven" and "7" mean the same digit.
CAPTION_TEMPLATES = (
    "a handwritten digit {w}",
    "a handwritten digit {d}",
    "the number {d}, handwritten",
    "the number {w}, handwritten",
    "a drawing of the number {w}",
    "a picture of the digit {d}",
    "handwritten {w}",
    "the digit {w}",
    "a scan of a handwritten {d}",
    "a white {w} on a black background",
    "a blurry handwritten {w}",
    "{d}",
    "{w}",
)

# Held-out prompts (`lcm eval --prompts heldout`): templates no training caption uses — not the teacher's
# (scripts/train_mini_teacher.py captions with CAPTION_TEMPLATES) and not a student's (`lcm data digits` draws from the
# same templates) — so a student that memorised the training strings cannot look better than it is. Only words the
# mini teacher's tokenizer holds as whole-word tokens, in new orders and combinations (tests/test_heldout_prompts.py
# checks both); nothing that changes what the image should show (no "black 7 on white": the digits are white on black).
HELD_OUT_TEMPLATES = (
    "a picture of the number {w}",
    "a scan of the digit {w}",
    "the handwritten digit {d}",
    "a drawing of a handwritten {w}",
    "handwritten number {d}",
    "the digit {d}, handwritten",
    "number {w}",
    "a handwritten {w} on a black background",
    "a white {d} on a black background",
    "a blurry picture of the number {d}",
    "a scan of the number {w}, handwritten",
    "digit {d}",
)
PROMPT_SETS = {"train": CAPTION_TEMPLATES, "heldout": HELD_OUT_TEMPLATES}

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0
DEFAULT_SIZE = 16
SPLITS = ("train", "held_out", "all")


def caption(label: int, template: int, templates: tuple[str, ...] = CAPTION_TEMPLATES) -> str:
    """Caption of digit `label` from template number `template` (taken modulo the number of templates)."""
    return templates[template % len(templates)].format(w=NUMBER_WORDS[label], d=label)


def random_caption(label: int, rng: random.Random) -> str:
    """A caption drawn uniformly from the templates with an explicit `random.Random`."""
    return caption(label, rng.randrange(len(CAPTION_TEMPLATES)))


def prompt_for(label: int) -> str:
    """The canonical evaluation prompt for a digit."""
    return caption(label, 0)


def eval_prompts(n: int, prompt_set: str = "train") -> tuple[list[str], list[int]]:
    """n evaluation prompts and their digits: digit i % 10, templates of `prompt_set` (a PROMPT_SETS key) cycling with
    i // 10 (so 10 × the number of templates cover every pair). The digits do not depend on the prompt set."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; valid: {', '.join(PROMPT_SETS)}")
    labels = [i % 10 for i in range(n)]
    return [caption(label, i // 10, PROMPT_SETS[prompt_set]) for i, label in enumerate(labels)], labels


def caption_vocabulary() -> list[str]:
    """Every word the captions use (for building a tokenizer vocab)."""
    words = set()
    for label in range(10):
        for t in range(len(CAPTION_TEMPLATES)):
            words.update(caption(label, t).replace(",", " , ").split())
    return sorted(words)


def _load_raw():
    from sklearn.datasets import load_digits  # sklearn is a dev extra: import only when the digits are needed

    d = load_digits()
    images = torch.from_numpy(d.images).float() / 16.0  # (1797, 8, 8) in [0, 1], ink = 1
    labels = torch.from_numpy(d.target).long()
    return images, labels


def split_indices(labels: torch.Tensor, split: str) -> torch.Tensor:
    """Deterministic stratified split: in each class, a fixed permutation's first 20 % are held out."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if split == "all":
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(SPLIT_SEED)
    held, train = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = round(HELD_OUT_FRACTION * len(idx))
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    out = torch.cat(held if split == "held_out" else train)
    return out.sort().values


def upscale(images8: torch.Tensor, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """(B, 8, 8) in [0, 1] → (B, 3, size, size) in [-1, 1]: bilinear upscaling, grey replicated to RGB."""
    x = images8[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    x = x.clamp(0, 1) * 2 - 1
    return x.expand(-1, 3, -1, -1).contiguous()


def load_digits_tensors(split: str = "train", size: int = DEFAULT_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, size, size) in [-1, 1] and labels (B,) of one split ("train", "held_out" or "all")."""
    images, labels = _load_raw()
    idx = split_indices(labels, split)
    return upscale(images[idx], size), labels[idx]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, C, H, W) → uint8 (B, H, W, C)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def export_digits_folder(out_dir, size: int = DEFAULT_SIZE, split: str = "train", seed: int = 0) -> Path:
    """Write one split as PNGs + `metadata.jsonl` ({"file_name", "text"} per line); captions drawn with `seed`."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_tensors(split, size)
    rng = random.Random(seed)
    pixels = to_uint8(images).numpy()
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, (arr, label) in enumerate(zip(pixels, labels.tolist())):
            name = f"{i:05d}_{label}.png"
            Image.fromarray(arr).save(out / name)
            f.write(json.dumps({"file_name": name, "text": random_caption(label, rng)}) + "\n")
    return out
