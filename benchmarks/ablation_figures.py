"""The attention ablation's pictures: D(a, m) maps, learned-decay heatmaps, receptive fields and sample grids
(benchmarks/ablation.py's `report` stage draws them)."""

from __future__ import annotations

import os

import numpy as np

VARIANTS = ("2d", "2d_row", "1d", "none", "softmax")
COLD, HOT = np.array([255, 255, 255]), np.array([20, 60, 160])


def colour(values: np.ndarray, low: float, high: float) -> np.ndarray:
    t = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)[..., None]
    return (COLD * (1 - t) + HOT * t).astype(np.uint8)


def decay_map(variant: str, g_row: float, g_col: float, grid: tuple[int, int]) -> np.ndarray:
    """D(a, m) over keys m for the query a in the middle of the grid (0 where m is not before a).

    From docs/lasad.md §1, as ops/lasad/reference.py: 2d g_row^(r_a-r_m) g_col^|c_a-c_m|; 2d_row
    g_col^(c_a-c_m) in a's row, else g_row^(r_a-r_m); 1d g^(a-m); none 1."""
    h, w = grid
    a = (h // 2) * w + w // 2
    index = np.arange(h * w)
    rows, cols = index // w, index % w
    dr, dc = rows[a] - rows, cols[a] - cols
    if variant == "2d":
        d = g_row ** dr.astype(float) * g_col ** np.abs(dc).astype(float)
    elif variant == "2d_row":
        d = np.where(dr == 0, g_col ** dc.astype(float), g_row ** dr.astype(float))
    elif variant == "1d":
        d = g_col ** (a - index).astype(float)
    else:
        d = np.ones(h * w)
    return np.where(index < a, d, 0.0).reshape(h, w)


def write_png(path: str, picture: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(picture).save(path)
    print(f"wrote {path}")


def label(picture: np.ndarray, texts: list[tuple[int, int, str]]) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    for x, y, text in texts:
        draw.text((x, y), text, fill=(0, 0, 0))
    return np.asarray(image)


def decay_heatmap(result: dict, cell: int = 34) -> np.ndarray:
    """Layers down, heads across; each cell's colour and number the learned decay (row | col)."""
    decays = result["decays"]
    axes = [(name, decays[name]) for name in ("decay_row", "decay_col") if decays[name][0] is not None]
    layers, heads = len(axes[0][1]), len(axes[0][1][0])
    margin, top = 60, 30
    width = margin + len(axes) * (heads * cell + 20)
    picture = np.full((top + layers * cell + 10, width, 3), 255, np.uint8)
    texts = [(4, 4, f"{result['variant']} seed {result['seed']}: learned decay g per head (x) and layer (y)")]
    for axis, (name, values) in enumerate(axes):
        values = np.asarray(values)
        x0 = margin + axis * (heads * cell + 20)
        texts.append((x0, top - 12, name.replace("decay_", "")))
        for layer in range(layers):
            texts.append((4, top + layer * cell + cell // 3, f"layer {layer}"))
            for head in range(heads):
                y, x = top + layer * cell, x0 + head * cell
                picture[y + 1:y + cell - 1, x + 1:x + cell - 1] = colour(np.asarray(values[layer, head]), 0.3, 1.0)
                text = f"{values[layer, head]:.2f}"[1:] if values[layer, head] < 1 else "1.0"
                texts.append((x + 3, y + cell // 3, text))
    return label(picture, texts)


def receptive_fields(result: dict, layer: int, grid=(16, 16), scale: int = 6) -> np.ndarray:
    """The D(a, m) map of every head of one layer, for the query in the middle of the grid (red)."""
    decays = result["decays"]
    g_row = decays["decay_row"][layer] or [1.0] * len(decays["decay_col"][layer])
    g_col = decays["decay_col"][layer] or [1.0] * len(g_row)
    tiles = []
    for head in range(len(g_row)):
        d = decay_map(result["variant"], g_row[head], g_col[head], grid)
        tile = colour(d, 0.0, 1.0)
        tile[grid[0] // 2, grid[1] // 2] = (220, 30, 30)
        tile = tile.repeat(scale, 0).repeat(scale, 1)
        tiles.append(np.pad(tile, ((2, 2), (2, 2), (0, 0)), constant_values=128))
    row = np.concatenate(tiles, axis=1)
    header = np.full((16, row.shape[1], 3), 255, np.uint8)
    return label(np.concatenate([header, row]), [(2, 2, f"{result['variant']}, layer {layer}: D(a, m) per head")])


def sample_grids(grids_dir: str) -> np.ndarray | None:
    """The run stage's 10 x 10 grids (one row per class, best CFG), side by side, one per variant (seed 0)."""
    panels = []
    for variant in VARIANTS:
        path = os.path.join(grids_dir, f"samples_{variant}_seed0.npy")
        if not os.path.isfile(path):
            continue
        images = np.load(path, allow_pickle=False)
        n, size = len(images), images.shape[1]
        panel = images.reshape(n // 10, 10, size, size, 3).transpose(0, 2, 1, 3, 4)
        panel = panel.reshape(n // 10 * size, 10 * size, 3)
        header = np.full((16, panel.shape[1], 3), 255, np.uint8)
        panels.append(np.pad(label(np.concatenate([header, panel]), [(2, 2, variant)]), ((0, 0), (0, 8), (0, 0)),
                             constant_values=255))
    return np.concatenate(panels, axis=1) if panels else None
