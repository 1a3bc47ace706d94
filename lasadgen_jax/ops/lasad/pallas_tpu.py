"""LASAD kernels for TPUs, lowered through Mosaic TPU (`jax.experimental.pallas.tpu`).

The chunk axis is the last grid axis, marked "arbitrary" (sequential on one core); batch, heads
and value tiles are "parallel". The state lives in a VMEM scratch buffer that persists across the
chunk axis and is zeroed at chunk 0. Inputs are [batch, heads, seq, dim] with dims padded to
multiples of 128 lanes (the wrapper in pallas.py transposes and pads), so every block is
(chunk, 128*k) and satisfies Mosaic's (8, 128) tiling.

Tested in interpret mode on CPU only (no TPU was available); see docs/lasad.md §6.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lasadgen_jax.ops.lasad import pallas_chunk
from lasadgen_jax.ops.lasad.pallas_chunk import BlockSizes, ChunkLayout

LANES = 128


def _kernel(decay_ref, q_ref, k_ref, v_ref, out_ref, *state_refs, layout: ChunkLayout, tangent):
    """One chunk; the state (and its tangent) persist in VMEM scratch across the chunk axis."""
    head = pl.program_id(1)
    log_row, log_col = decay_ref[head, 0], decay_ref[head, 1]

    @pl.when(pl.program_id(_chunk_axis(layout)) == 0)
    def _():
        for ref in state_refs:
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    carry = tuple(ref[...] for ref in state_refs)
    values = pallas_chunk.load_chunk(layout, q_ref, k_ref, v_ref, 0)
    out, carry = pallas_chunk.step_with_tangent(
        pallas_chunk.step_of(layout), tangent, layout, values, carry[0] if tangent is None else carry,
        log_row, log_col,
    )
    for ref, value in zip(state_refs, (carry,) if tangent is None else carry):
        ref[...] = value
    pallas_chunk.store_chunk(layout, out_ref, 0, out)


def _chunk_axis(layout: ChunkLayout) -> int:
    return 4 if layout.variant == "2d" else 3


def cells(q, k, v, decays, *, layout: ChunkLayout, block: BlockSizes, tangent, out_dtype, interpret: bool):
    """The kernel on packed inputs: q, k [B, H, L, d], v [B, H, L, dv] with L = layout.padded_length
    and d, dv multiples of 128; decays [H, 2] float32. Returns [B, H, L, dv] (with tangent 'row' or
    'col', the output's derivative along that log decay). Tiles are 128 lanes; of `block` only the
    chunk sizes (already in `layout`) apply here."""
    batch, heads, length, d = q.shape
    dv = v.shape[-1]
    t = layout.chunk_tokens
    decay_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    if layout.variant != "2d":
        dv_block = LANES
        grid = (batch, heads, dv // dv_block, layout.num_chunks)
        key_spec = pl.BlockSpec((None, None, t, d), lambda b, h, j, c: (b, h, c, 0))
        value_spec = pl.BlockSpec((None, None, t, dv_block), lambda b, h, j, c: (b, h, c, j))
        out_spec, out_shape = value_spec, (batch, heads, length, dv)
        state = pltpu.VMEM((d, dv_block), jnp.float32)
        semantics = ("parallel", "parallel", "parallel", "arbitrary")
    else:
        # Column states: wp x d x dv floats; tile the key dim by 128 lanes (partial outputs).
        d_block, dv_block = LANES, LANES
        key_tiles = d // d_block
        grid = (batch, heads, dv // dv_block, key_tiles, layout.num_chunks)
        key_spec = pl.BlockSpec((None, None, t, d_block), lambda b, h, j, i, c: (b, h, c, i))
        value_spec = pl.BlockSpec((None, None, t, dv_block), lambda b, h, j, i, c: (b, h, c, j))
        out_spec = pl.BlockSpec((None, None, None, t, dv_block), lambda b, h, j, i, c: (i, b, h, c, j))
        out_shape = (key_tiles, batch, heads, length, dv)
        state = pltpu.VMEM((layout.row_slots, d_block * dv_block), jnp.float32)
        semantics = ("parallel", "parallel", "parallel", "parallel", "arbitrary")
    partial_dtype = jnp.float32 if layout.variant == "2d" else out_dtype
    out = pl.pallas_call(
        functools.partial(_kernel, layout=layout, tangent=tangent),
        out_shape=jax.ShapeDtypeStruct(out_shape, partial_dtype),
        grid=grid,
        in_specs=[decay_spec, key_spec, key_spec, value_spec],
        out_specs=out_spec,
        scratch_shapes=[state] if tangent is None else [state, state],
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=interpret,
        name=f"lasad_{layout.variant}{'_d_' + tangent if tangent else ''}",
    )(decays, q, k, v)
    if layout.variant == "2d":
        out = jnp.sum(out, axis=0).astype(out_dtype)
    return out
