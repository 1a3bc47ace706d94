"""How the model's sequence lines up with grid cells (docs/lasad.md §1, "Alignment in the model").

A sequence holds P prefix (class) positions, then the tokens of cells 0 .. N-2 of an h x w grid:
P + N - 1 positions. Position j attends to positions <= j. The query at position P-1+a predicts
cell a; the key at position P+m belongs to cell m. Every attention type follows this.
"""

from __future__ import annotations

import jax.numpy as jnp

from lasadgen_jax.ops.lasad import common


def check_sequence(x, dim: int, grid, num_prefix: int) -> tuple[int, int]:
    """Checks x: [batch, num_prefix + h*w - 1, dim]; returns (h, w)."""
    h, w = common.check_grid(grid)
    if num_prefix < 1:
        raise ValueError(
            f"num_prefix must be >= 1 (the query for cell 0 sits on the last prefix position), got {num_prefix}"
        )
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be [batch, seq, dim={dim}], got shape {x.shape}")
    if x.shape[1] != num_prefix + h * w - 1:
        raise ValueError(
            f"x has {x.shape[1]} positions; grid {h}x{w} with num_prefix {num_prefix} needs "
            f"num_prefix + h*w - 1 = {num_prefix + h * w - 1}"
        )
    return h, w


def sequence_cells(grid, num_prefix: int):
    """The cells that rotate the queries and keys of the P + N - 1 positions (2D RoPE).

    Returns (query_rows, query_cols, key_rows, key_cols), int arrays of length P + N - 1. The query
    at position P-1+a is rotated by its target cell a; the key at position P+m by its own cell m;
    prefix positions (queries before P-1, keys before P) by cell (0, 0), the identity.
    """
    h, w = grid
    cells = jnp.arange(h * w)
    query_cells = jnp.concatenate([jnp.zeros((num_prefix - 1,), cells.dtype), cells])
    key_cells = jnp.concatenate([jnp.zeros((num_prefix,), cells.dtype), cells[:-1]])
    return query_cells // w, query_cells % w, key_cells // w, key_cells % w


def decode_cells(cell, w: int):
    """(query_row, query_col, key_row, key_col) for the decode step that predicts `cell` >= 1:
    the query targets `cell`, the key belongs to the token of cell-1. Each an array of shape [1]."""
    cell = jnp.asarray(cell)
    return (cell // w)[None], (cell % w)[None], ((cell - 1) // w)[None], ((cell - 1) % w)[None]
