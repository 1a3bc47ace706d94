"""Pallas ref helpers of the chunk family's bodies: one chunk's values in, its outputs out.

The Triton bodies (chunk_gpu.py) read a chunk from refs holding the whole sequence, the Mosaic TPU
bodies (chunk_tpu.py) from refs holding the chunk's block; both then call the step functions of
chunk_math.py on what `load_chunk` returns.
"""

from __future__ import annotations

from jax.experimental import pallas as pl

from lasadgen_jax.ops.lasad.chunk_math import ChunkLayout


def load_chunk(layout: ChunkLayout, q_ref, k_ref, v_ref, start):
    """The values one step reads, from refs holding the chunk at slot `start` (GPU: the whole
    sequence; TPU: the chunk's block, start 0)."""
    t = layout.chunk_tokens
    whole = pl.ds(start, t)
    if layout.variant != "2d":
        return q_ref[whole, :], k_ref[whole, :], v_ref[whole, :]
    row = lambda ref, i: ref[pl.ds(start + i * layout.row_slots, layout.row_slots), :]
    rows = range(layout.rows_per_chunk)
    return ([row(q_ref, i) for i in rows], k_ref[whole, :], v_ref[whole, :],
            [row(k_ref, i) for i in rows], [row(v_ref, i) for i in rows])


def store_chunk(layout: ChunkLayout, out_ref, start, out):
    """Writes one chunk's outputs (for `2d` a list of row outputs) at slot `start` of out_ref."""
    if layout.variant != "2d":
        out_ref[pl.ds(start, layout.chunk_tokens), :] = out.astype(out_ref.dtype)
        return
    for i, row_out in enumerate(out):
        out_ref[pl.ds(start + i * layout.row_slots, layout.row_slots), :] = row_out.astype(out_ref.dtype)
