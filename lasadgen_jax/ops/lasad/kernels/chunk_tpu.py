"""LASAD kernels for TPUs, lowered through Mosaic TPU (`jax.experimental.pallas.tpu`).

The chunk axis is the last grid axis, marked "arbitrary" (sequential on one core); batch, heads
and value tiles are "parallel". The state lives in a VMEM scratch buffer that persists across the
chunk axis and is zeroed at chunk 0. Inputs are [batch, heads, seq, dim] with dims padded to
multiples of 128 lanes (chunk.py transposes and pads), so every block is
(chunk, 128*k) and satisfies Mosaic's (8, 128) tiling.

Checked in interpret mode on CPU and lowered for TPU with jax.export, never run on a TPU; see docs/lasad.md §6.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lasadgen_jax.ops.lasad import chunk_math
from lasadgen_jax.ops.lasad.chunk_math import ChunkLayout
from lasadgen_jax.ops.lasad.kernels import chunk_refs
from lasadgen_jax.ops.lasad.kernels.backend import TPU_LANES as LANES
from lasadgen_jax.ops.lasad.kernels.chunk_config import BlockSizes


def _kernel(decay_ref, q_ref, k_ref, v_ref, out_ref, *state_refs, layout: ChunkLayout, tangent):
    """One chunk; the state (and its tangent) persist in VMEM scratch across the chunk axis."""
    head = pl.program_id(1)
    log_row, log_col = decay_ref[head, 0], decay_ref[head, 1]

    @pl.when(pl.program_id(_chunk_axis(layout)) == 0)
    def _():
        for ref in state_refs:
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    carry = tuple(ref[...] for ref in state_refs)
    values = chunk_refs.load_chunk(layout, q_ref, k_ref, v_ref, 0)
    out, carry = chunk_math.step_with_tangent(
        chunk_math.step_of(layout), tangent, layout, values, carry[0] if tangent is None else carry,
        log_row, log_col,
    )
    for ref, value in zip(state_refs, (carry,) if tangent is None else carry):
        ref[...] = value
    chunk_refs.store_chunk(layout, out_ref, 0, out)


def _chunk_axis(layout: ChunkLayout) -> int:
    return 4 if layout.variant == "2d" else 3


def cells(q, k, v, decays, *, layout: ChunkLayout, tiles: BlockSizes, tangent, out_dtype, interpret: bool):
    """The kernel on packed inputs: q, k [B, H, L, d], v [B, H, L, dv] with L = layout.padded_length
    and d, dv multiples of 128; decays [H, 2] float32. Returns [B, H, L, dv] (with tangent 'row' or
    'col', the output's derivative along that log decay). Tiles are 128 lanes; of `tiles` only the
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


# ----------------------------------------------------------------------------- chunk backward


def _sequential_pass_kernel(decay_ref, keys_ref, values_ref, out_ref, carry_ref, *, layout: ChunkLayout, reverse):
    """Writes the carried d x dv matrix at this chunk, then moves it on by the chunk: forward, the
    state (keys k, values v); reverse, the adjoint (keys q, values d_out)."""
    head = pl.program_id(1)
    log_row, log_col = decay_ref[head, 0], decay_ref[head, 1]

    @pl.when(pl.program_id(3) == 0)
    def _():
        carry_ref[...] = jnp.zeros(carry_ref.shape, jnp.float32)

    carry = carry_ref[...]
    out_ref[...] = carry.astype(out_ref.dtype)
    if reverse:
        carry_ref[...] = chunk_math.generic_previous_adjoint(layout, keys_ref[...], values_ref[...], carry, log_row,
                                                               log_col)
    else:
        carry_ref[...] = chunk_math.generic_next_state(layout, keys_ref[...], values_ref[...], carry, log_row,
                                                         log_col)


def _sequential_pass(decays, keys, values, *, layout: ChunkLayout, reverse: bool, interpret: bool):
    """[B, H, C, d, dv]: every chunk's starting state (reverse=False; keys k, values v) or dL/d(state
    at the next chunk's start) (reverse=True; keys q, values d_out); carried in float32, stored in
    the inputs' dtype (the gradient kernel uses them as matmul inputs)."""
    batch, heads, _, d = keys.shape
    dv = values.shape[-1]
    t, chunks = layout.chunk_tokens, layout.num_chunks
    chunk = (lambda c: chunks - 1 - c) if reverse else (lambda c: c)
    return pl.pallas_call(
        functools.partial(_sequential_pass_kernel, layout=layout, reverse=reverse),
        out_shape=jax.ShapeDtypeStruct((batch, heads, chunks, d, dv), keys.dtype),
        grid=(batch, heads, dv // LANES, chunks),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            pl.BlockSpec((None, None, t, d), lambda b, h, j, c: (b, h, chunk(c), 0)),
            pl.BlockSpec((None, None, t, LANES), lambda b, h, j, c: (b, h, chunk(c), j)),
        ],
        out_specs=pl.BlockSpec((None, None, None, d, LANES), lambda b, h, j, c: (b, h, chunk(c), 0, j)),
        scratch_shapes=[pltpu.VMEM((d, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"lasad_{layout.variant}_{'adjoints' if reverse else 'states'}",
    )(decays, keys, values)


def _gradient_kernel(decay_ref, q_ref, k_ref, v_ref, d_out_ref, state_ref, adjoint_ref,
                     dq_ref, dk_ref, dv_ref, d_decay_ref, *, layout: ChunkLayout):
    head = pl.program_id(1)
    log_row, log_col = decay_ref[head, 0], decay_ref[head, 1]
    chunk = ([q_ref[...]], [k_ref[...]], [v_ref[...]], [d_out_ref[...]])  # one block: the whole chunk
    (dq,), (dk,), (dv,), d_row, d_col = chunk_math.generic_gradients(
        layout, chunk, state_ref[...], adjoint_ref[...], log_row, log_col)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    d_decay_ref[...] = chunk_math.pair_vector(d_row, d_col, d_decay_ref.shape)


def chunk_gradients(q, k, v, d_out, decays, *, layout: ChunkLayout, tiles: BlockSizes, interpret: bool):
    """The generic kernel's chunk backward on packed heads-major inputs q, k [B, H, L, d], v, d_out
    [B, H, L, dv] (dims multiples of 128): states forward, adjoints in reverse (chunk axis
    "arbitrary", the carry in VMEM), then every chunk's gradients in parallel. Returns (dq, dk, dv)
    in q.dtype and the log-decay gradients [H, 2] float32. `tiles` is unused beyond the layout."""
    del tiles
    batch, heads, length, d = q.shape
    dv = v.shape[-1]
    t, chunks = layout.chunk_tokens, layout.num_chunks
    states = _sequential_pass(decays, k, v, layout=layout, reverse=False, interpret=interpret)
    adjoints = _sequential_pass(decays, q, d_out, layout=layout, reverse=True, interpret=interpret)
    chunk_spec = lambda width: pl.BlockSpec((None, None, t, width), lambda b, h, c: (b, h, c, 0))
    matrix_spec = pl.BlockSpec((None, None, None, d, dv), lambda b, h, c: (b, h, c, 0, 0))
    decay_out_spec = pl.BlockSpec((None, None, None, 1, LANES), lambda b, h, c: (b, h, c, 0, 0))
    dq, dk, d_v, d_decays = pl.pallas_call(
        functools.partial(_gradient_kernel, layout=layout),
        out_shape=[jax.ShapeDtypeStruct(x.shape, q.dtype) for x in (q, k, v)]
        + [jax.ShapeDtypeStruct((batch, heads, chunks, 1, LANES), jnp.float32)],
        grid=(batch, heads, chunks),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), chunk_spec(d), chunk_spec(d), chunk_spec(dv),
                  chunk_spec(dv), matrix_spec, matrix_spec],
        out_specs=[chunk_spec(d), chunk_spec(d), chunk_spec(dv), decay_out_spec],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
        name=f"lasad_{layout.variant}_gradients",
    )(decays, q, k, v, d_out, states, adjoints)
    return dq, dk, d_v, jnp.sum(d_decays[..., 0, :2], axis=(0, 2))
