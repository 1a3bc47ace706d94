"""LlamaGen's extraction crops: center crop at 1.1x then ten-crop, or center crop + horizontal flip.

`tencrop`: resize the short side to round(1.1 * size) and center-crop that square (ADM's
center_crop_arr: halve with a box filter while the image is at least twice the target, then
bicubic), then torchvision's TenCrop(size): the four corners and the center, then the same five of
the mirrored image. `flip`: center-crop at `size`, then the image and its mirror.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CROP_RANGE = 1.1
NUM_CROPS = {"tencrop": 10, "flip": 2}


def check_crop_mode(mode: str) -> None:
    if mode not in NUM_CROPS:
        raise ValueError(f"unknown --crops {mode!r}; known: {sorted(NUM_CROPS)}")


def center_crop_resized(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the short side is `size` and crop the central size x size square (uint8 [H, W, 3])."""
    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(side // 2 for side in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(side * scale) for side in pil.size), resample=Image.BICUBIC)
    array = np.asarray(pil)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def five_crop(image: np.ndarray, size: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right and center size x size crops (torchvision's order)."""
    height, width = image.shape[:2]
    if size > height or size > width:
        raise ValueError(f"crop size {size} is larger than the image {height}x{width}")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return [image[:size, :size], image[:size, width - size:], image[height - size:, :size],
            image[height - size:, width - size:], image[top:top + size, left:left + size]]


def make_crops(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """uint8 [crops, size, size, 3] of one RGB image, by LlamaGen's recipe for `mode`."""
    check_crop_mode(mode)
    if mode == "flip":
        square = center_crop_resized(image, size)
        return np.stack([square, square[:, ::-1]])
    square = center_crop_resized(image, int(size * CROP_RANGE))
    return np.stack(five_crop(square, size) + five_crop(square[:, ::-1], size))
