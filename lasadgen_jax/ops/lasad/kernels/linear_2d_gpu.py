"""The linear-time `2d` kernel's GPU body (Triton lowering; docs/lasad.md §8).

One program per (batch, head, value tile of `dv_block` columns) walks the row chunks in a loop,
forward from the first or (reverse sweep) from the last. Pallas's Triton lowering has no scratch
memory that persists across a loop, and all w column states do not fit a program's registers, so the states
(and the sweep's two adjoints) live in a float32 buffer of the program's own in HBM, w x d x
dv_block (256 KiB at w = 64, d = 64, dv_block = 16), read and written once per column per chunk:
it stays in L2 while the program runs. Stores that later loads of the same program read are
ordered by a thread-block barrier (`debug_barrier`; the chunk code calls `barrier`).

Written in the portable `pl` subset (refs, strided slices, `dot`, `fori_loop`), so the same body
runs in interpret mode on CPU, which the tests do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lasadgen_jax.ops.lasad.kernels.linear_2d_chunk import (
    ChunkGeometry,
    backward_chunk,
    forward_chunk,
)

DECAY_LANES = 16  # the per-program log-decay gradient block: two used lanes, a power of two


def _barrier(interpret: bool):
    if interpret:
        return lambda: None
    return pltriton.debug_barrier


def _zero(refs):
    """Zeroes [w, d, dv_block] buffers one column at a time (a whole-buffer tile would not fit registers)."""

    def column(c, carry):
        for ref in refs:
            ref[c] = jnp.zeros(ref.shape[1:], jnp.float32)
        return carry

    jax.lax.fori_loop(0, refs[0].shape[0], column, 0)


def _forward_kernel(decay_ref, q_ref, k_ref, v_ref, out_ref, state_ref, *, geometry: ChunkGeometry, num_chunks: int,
                    interpret: bool):
    barrier = _barrier(interpret)
    log_row, log_col = decay_ref[0], decay_ref[1]
    _zero([state_ref])
    barrier()
    t = geometry.rows * geometry.row_slots

    def chunk(index, carry):
        bases = (pl.multiple_of(index * t, t), pl.multiple_of(jnp.maximum(index - 1, 0) * t, t))
        forward_chunk((q_ref, k_ref, v_ref, out_ref), (k_ref, v_ref), state_ref, bases, index, log_row, log_col,
                      geometry=geometry, barrier=barrier)
        return carry

    jax.lax.fori_loop(0, num_chunks, chunk, 0)


def _specs(length, width):
    """BlockSpecs of the whole sequence of one (batch, head), the head dim whole ('key') or a tile."""
    key = lambda dim: pl.BlockSpec((None, length, None, dim), lambda b, h, j: (b, 0, h, 0))
    tile = lambda dim: pl.BlockSpec((None, length, None, dim), lambda b, h, j: (b, 0, h, j))
    return key, tile


def _compiler_params(num_warps: int, num_stages: int):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def forward(q, k, v, decays, *, geometry: ChunkGeometry, num_chunks: int, dv_block: int, num_warps: int,
            num_stages: int, interpret: bool, name: str = ""):
    """Float32 [B, L, H, dv] (no prefix) from packed q, k [B, L, H, d], v [B, L, H, dv] (L =
    num_chunks * R * wp; d, dv powers of two >= 16, dv a multiple of dv_block); decays [H, 2]."""
    batch, length, heads, d = q.shape
    dv = v.shape[-1]
    key, tile = _specs(length, geometry.width)
    state_shape = (batch, heads, dv // dv_block, geometry.row_slots, d, dv_block)
    out, _ = pl.pallas_call(
        functools.partial(_forward_kernel, geometry=geometry, num_chunks=num_chunks, interpret=interpret),
        out_shape=[jax.ShapeDtypeStruct((batch, length, heads, dv), jnp.float32),
                   jax.ShapeDtypeStruct(state_shape, jnp.float32)],
        grid=(batch, heads, dv // dv_block),
        in_specs=[pl.BlockSpec((None, 2), lambda b, h, j: (h, 0)), key(d), key(d), tile(dv_block)],
        out_specs=[tile(dv_block),
                   pl.BlockSpec((None, None, None, *state_shape[3:]), lambda b, h, j: (b, h, j, 0, 0, 0))],
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"lasad_linear_2d{name}",
    )(decays, q, k, v)
    return out


def _sweep_kernel(decay_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, d_decay_ref, adjoint_ref, adjoint_row_ref,
                  *, geometry: ChunkGeometry, num_chunks: int, interpret: bool):
    barrier = _barrier(interpret)
    log_row, log_col = decay_ref[0], decay_ref[1]
    _zero([adjoint_ref, adjoint_row_ref])
    barrier()
    t = geometry.rows * geometry.row_slots

    def chunk(index, sums):
        base = pl.multiple_of((num_chunks - 1 - index) * t, t)
        d_row, d_col = backward_chunk((q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref), (adjoint_ref, adjoint_row_ref),
                                      base, log_row, log_col, geometry=geometry, barrier=barrier)
        return sums[0] + d_row, sums[1] + d_col

    zero = jnp.zeros((1, 1), jnp.float32)
    d_row, d_col = jax.lax.fori_loop(0, num_chunks, chunk, (zero, zero))
    lane = jax.lax.broadcasted_iota(jnp.int32, d_decay_ref.shape, 1)
    d_decay_ref[...] = jnp.where(lane == 0, d_row, jnp.where(lane == 1, d_col, 0.0))


def reverse_sweep(q, k, v, d_out, decays, *, geometry: ChunkGeometry, num_chunks: int, dv_block: int, num_warps: int,
                  num_stages: int, interpret: bool):
    """(dk [B, L, H, d] float32 summed over value tiles, dv [B, L, H, dv] float32, the log-decay
    gradients [H, 2] float32) from packed inputs as `forward`'s (d_out like v)."""
    batch, length, heads, d = q.shape
    dv = v.shape[-1]
    value_tiles = dv // dv_block
    key, tile = _specs(length, geometry.width)
    adjoint_shape = (batch, heads, value_tiles, geometry.row_slots, d, dv_block)
    adjoint_spec = pl.BlockSpec((None, None, None, *adjoint_shape[3:]), lambda b, h, j: (b, h, j, 0, 0, 0))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    dk, d_v, d_decays, _, _ = pl.pallas_call(
        functools.partial(_sweep_kernel, geometry=geometry, num_chunks=num_chunks, interpret=interpret),
        out_shape=[f32(value_tiles, batch, length, heads, d), f32(batch, length, heads, dv),
                   f32(batch, heads, value_tiles, 1, DECAY_LANES), f32(*adjoint_shape), f32(*adjoint_shape)],
        grid=(batch, heads, value_tiles),
        in_specs=[pl.BlockSpec((None, 2), lambda b, h, j: (h, 0)), key(d), key(d), tile(dv_block), tile(dv_block)],
        out_specs=[pl.BlockSpec((None, None, length, None, d), lambda b, h, j: (j, b, 0, h, 0)), tile(dv_block),
                   pl.BlockSpec((None, None, None, 1, DECAY_LANES), lambda b, h, j: (b, h, j, 0, 0)),
                   adjoint_spec, adjoint_spec],
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="lasad_linear_2d_sweep",
    )(decays, q, k, v, d_out)
    return jnp.sum(dk, axis=0), d_v, jnp.sum(d_decays[..., 0, :2], axis=(0, 2))
