"""How good a tokenizer is: PSNR, codebook usage, and a PNG of originals above their reconstructions."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (any float array) to uint8 [0, 255], clipping what falls outside."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def psnr(originals, reconstructions) -> float:
    """Peak signal-to-noise ratio in dB over a batch, both as uint8 images (peak 255), one MSE for all."""
    originals, reconstructions = np.asarray(originals, np.float64), np.asarray(reconstructions, np.float64)
    if originals.shape != reconstructions.shape:
        raise ValueError(f"psnr: shapes differ, {originals.shape} vs {reconstructions.shape}")
    mse = np.mean((originals - reconstructions) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def codebook_usage(codes, codebook_size: int) -> tuple[float, float]:
    """(fraction of codebook entries used at least once, perplexity of the code histogram)."""
    counts = np.bincount(np.asarray(codes).reshape(-1), minlength=codebook_size)
    if len(counts) > codebook_size:
        raise ValueError(f"codes reach {len(counts) - 1}, outside a codebook of {codebook_size}")
    probabilities = counts / counts.sum()
    nonzero = probabilities[probabilities > 0]
    return float(np.count_nonzero(counts) / codebook_size), float(np.exp(-np.sum(nonzero * np.log(nonzero))))


def save_comparison_png(originals, reconstructions, path: str, columns: int = 8) -> None:
    """A grid whose rows alternate: `columns` originals, then their reconstructions (uint8 [N, H, W, C])."""
    originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
    count = (len(originals) // columns) * columns
    if count == 0:
        raise ValueError(f"save_comparison_png needs at least {columns} images, got {len(originals)}")
    height, width, channels = originals.shape[1:]
    rows = []
    for start in range(0, count, columns):
        for batch in (originals, reconstructions):
            rows.append(np.concatenate(list(batch[start:start + columns]), axis=1))
    grid = np.concatenate(rows, axis=0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if channels == 1 else grid).save(path)
