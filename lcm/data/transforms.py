"""Transforms (PIL + torch; randomness only from the generator passed in): cover-resize, crop, flip, and SDXL's
size/crop micro-conditioning (Podell et al. 2023, arXiv:2307.01952 §2.2), in **(height, width)** order throughout:
`original_size` = (h, w) as loaded, `crop_top_left` = (top, left) in the resized image (after the optional flip),
`target_size` = the (h, w) trained at.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image


def cover_size(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) after scaling an image of `size_hw` just enough to cover `target_hw`, keeping its aspect ratio.

    For a square target this is "shorter side = resolution"; for a bucket it is the scale at which one side fits.
    """
    (h, w), (th, tw) = size_hw, target_hw
    scale = max(th / h, tw / w)
    return max(th, round(h * scale)), max(tw, round(w * scale))


def draw_crop_flip(resized_hw: tuple[int, int], target_hw: tuple[int, int], *, center_crop: bool, random_flip: bool,
                   generator: torch.Generator | None) -> tuple[int, int, bool]:
    """(top, left, flip) of a `target_hw` crop from a `resized_hw` image: centred or drawn, then a coin for the flip
    (the generator is only drawn from when something is random)."""
    (h, w), (th, tw) = resized_hw, target_hw
    if center_crop:
        top, left = (h - th) // 2, (w - tw) // 2
    else:
        top = int(torch.randint(0, h - th + 1, (), generator=generator))
        left = int(torch.randint(0, w - tw + 1, (), generator=generator))
    flip = random_flip and torch.rand((), generator=generator).item() < 0.5
    return top, left, flip


def crop_conditioning(resized_hw: tuple[int, int], target_hw: tuple[int, int], top: int, left: int,
                      flip: bool) -> tuple[int, int]:
    """SDXL's crop_top_left for a crop at (top, left) of the resized image, as it sits after the optional flip.

    Important: condition on the crop in the *flipped* image (as SDXL / diffusers do), else the model learns that
    flipped crops come from the other side.
    """
    return top, (resized_hw[1] - left - target_hw[1]) if flip else left


def transform_image(image: Image.Image, target_hw: tuple[int, int], top: int, left: int, flip: bool) -> torch.Tensor:
    """Resize to cover `target_hw`, crop at (top, left), maybe flip → (3, h, w) float32 in [-1, 1]."""
    (th, tw), (h, w) = target_hw, cover_size((image.height, image.width), target_hw)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    image = image.crop((left, top, left + tw, top + th))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0


def sdxl_item(image: Image.Image, caption: str, target: tuple[int, int], top: int, left: int,
              flip: bool) -> dict[str, Any]:
    """One training item: pixels cropped at (top, left) of the resized image, caption, SDXL micro-conditioning."""
    size = (image.height, image.width)  # (h, w): SDXL's order, not PIL's (w, h)
    return {
        "pixel_values": transform_image(image, target, top, left, flip),
        "caption": caption,
        "original_size": torch.tensor(size),
        "crop_top_left": torch.tensor(crop_conditioning(cover_size(size, target), target, top, left, flip)),
        "target_size": torch.tensor(target),
    }


def add_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """SDXL UNet `time_ids` (B, 6) = [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (arXiv:2307.01952 §2.2)."""
    parts = [torch.atleast_2d(torch.as_tensor(x)) for x in (original_size, crop_top_left, target_size)]
    time_ids = torch.cat(parts, dim=-1)
    return time_ids if dtype is None else time_ids.to(dtype)
