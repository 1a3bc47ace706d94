"""The opt-in `2d` backward of the GPU chunk kernel: a reverse row sweep (`ChunkOptions(backward_2d="sweep")`).

The default backward of the `2d` kernel (chunk.py) re-runs the forward kernel three times on
flipped grids and twice more in tangent mode, with twice the column states. This one needs two
calls and no flips (docs/lasad.md §6, "Sweep backward"):

  1. dq = forward(q=do, k=v, v=k): the forward kernel as it is (the adjoint of the output read).
  2. One reverse sweep over the chunks (this module) that carries the adjoint column states
         A[c] = dL/dC[c] = sum_{later queries a in column c} g_row^(r_a - r0) q_a do_a^T
     (r0: the first row after the current chunk) in registers, [wp, d_tile * dv_tile] float32
     like the forward's column states, and writes per key slot m
         dk_m      = sum_{a > m} D(a, m) (do_a . v_m) q_a
         dk_col_m  = sum_{a > m} |c_a - c_m| D(a, m) (do_a . v_m) q_a
         dv_m      = sum_{a > m} D(a, m) (q_a . k_m) do_a
     so that dL/dlog g_col = sum_m k_m . dk_col_m, and dL/dlog g_row comes from dq and dk by
     sum_(a,m) (r_a - r_m) P(a, m) = sum_a r_a (q_a . dq_a) - sum_m r_m (k_m . dk_m).

Nothing is saved by the forward pass beyond its inputs (no checkpointed states: the sweep needs
only the adjoint, which it builds itself from q and do). GPU (Triton lowering) only; there is
no Mosaic TPU version, and chunk.py raises for `backward_2d="sweep"` on backend "tpu".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lasadgen_jax.ops.lasad.chunk_math import ChunkLayout, column_smoothing, dot
from lasadgen_jax.ops.lasad.kernels import chunk_gpu
from lasadgen_jax.ops.lasad.kernels.chunk_config import BlockSizes


def key_row_decay(layout: ChunkLayout, log_row, log_col, key_row: int):
    """([T, wp] D(a, m), [T, wp] |c_a - c_m|), float32, for every query slot a of the chunk and the
    key slots m of local row `key_row`; D is 0 unless m comes before a."""
    t, width = layout.chunk_tokens, layout.row_slots
    shape = (t, width)
    query = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    key = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + key_row * width
    slots = jnp.int32(width)  # slots are >= 0: truncating division is floor division
    row_distance = (jax.lax.div(query, slots) - jax.lax.div(key, slots)).astype(jnp.float32)
    col_distance = jnp.abs(jax.lax.rem(query, slots) - jax.lax.rem(key, slots)).astype(jnp.float32)
    causal = key < query
    log_decay = log_row * row_distance + log_col * col_distance
    return jnp.where(causal, jnp.exp(jnp.where(causal, log_decay, 0.0)), 0.0), col_distance


def column_distance(width: int):
    """[wp, wp] float32: |c - c'|, the derivative of log g_col^|c - c'| along log g_col."""
    c = jax.lax.broadcasted_iota(jnp.int32, (width, width), 0)
    c_other = jax.lax.broadcasted_iota(jnp.int32, (width, width), 1)
    return jnp.abs(c - c_other).astype(jnp.float32)


def rows_backward_step(layout: ChunkLayout, chunk, adjoint, log_row, log_col):
    """One chunk of the reverse sweep (R rows of the `2d` layout), any key/value-dim tile.

    chunk: (q [T, dk], do [T, dv], and per local row i the [wp, *] tiles q_rows, do_rows, k_rows,
    v_rows). adjoint: [wp, dk * dv] float32, dL/dC for the column states *after* this chunk (what
    later chunks read), zero after the last chunk. With X[c'] = sum_i g_row^(R - i) k_(i,c') v_(i,c')^T
    the chunk's row fold C <- g_row^R C + W X (W = g_col^|c - c'|, symmetric), a key in local row
    i, column c' gets from later chunks
        dk += g_row^(R - i) (W A)[c'] v,   dv += g_row^(R - i) (W A)[c']^T k,
        dk_col += g_row^(R - i) ((|c - c'| * W) A)[c'] v,
    and from the chunk's own later queries the masked products of the forward, transposed. Then
    A <- g_row^R A + sum_i g_row^i q_i do_i^T (by column): the adjoint before the chunk.
    Returns ((dk, dk_col, dv) lists of R row tiles in float32, the adjoint before the chunk).
    """
    q, do, q_rows, do_rows, k_rows, v_rows = chunk
    dtype = q.dtype
    width, rows = layout.row_slots, layout.rows_per_chunk
    key_dim, value_dim = q.shape[1], do.shape[1]
    smoothing = column_smoothing(width, log_col)
    later = adjoint.astype(dtype)
    d_fold = dot(smoothing.astype(dtype), later).reshape(width, key_dim, value_dim)
    d_fold_col = dot((smoothing * column_distance(width)).astype(dtype), later).reshape(width, key_dim, value_dim)
    dks, dk_cols, dvs = [], [], []
    for i, (k_row, v_row) in enumerate(zip(k_rows, v_rows)):
        decay, col_distance = key_row_decay(layout, log_row, log_col, i)
        do_v = dot(do, v_row, (1, 1)) * decay  # [T queries, wp keys]
        q_k = dot(q, k_row, (1, 1)) * decay
        weight = jnp.exp(log_row * (rows - i))
        k_row32, v_row32 = k_row.astype(jnp.float32), v_row.astype(jnp.float32)
        dks.append(dot(do_v.astype(dtype), q, (0, 0)) + weight * jnp.sum(d_fold * v_row32[:, None, :], axis=2))
        dk_cols.append(
            dot((do_v * col_distance).astype(dtype), q, (0, 0))
            + weight * jnp.sum(d_fold_col * v_row32[:, None, :], axis=2)
        )
        dvs.append(dot(q_k.astype(dtype), do, (0, 0)) + weight * jnp.sum(d_fold * k_row32[:, :, None], axis=1))
    query_sums = sum(
        jnp.exp(log_row * i) * (q_row.astype(jnp.float32)[:, :, None] * do_row.astype(jnp.float32)[:, None, :])
        for i, (q_row, do_row) in enumerate(zip(q_rows, do_rows))
    )
    adjoint = jnp.exp(log_row * rows) * adjoint + query_sums.reshape(width, key_dim * value_dim)
    return (dks, dk_cols, dvs), adjoint


def _sweep_kernel(decay_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dk_col_ref, dv_ref, *, layout: ChunkLayout):
    """Walks the chunks of one (batch, head, value tile, key tile) from the last to the first; the
    adjoint column states are the loop carry."""
    log_row, log_col = decay_ref[0], decay_ref[1]
    t, width = layout.chunk_tokens, layout.row_slots
    rows = range(layout.rows_per_chunk)

    def chunk(index, adjoint):
        start = pl.multiple_of((layout.num_chunks - 1 - index) * t, t)
        row = lambda ref, i: ref[pl.ds(start + i * width, width), :]
        values = (q_ref[pl.ds(start, t), :], do_ref[pl.ds(start, t), :], [row(q_ref, i) for i in rows],
                  [row(do_ref, i) for i in rows], [row(k_ref, i) for i in rows], [row(v_ref, i) for i in rows])
        outs, adjoint = rows_backward_step(layout, values, adjoint, log_row, log_col)
        for ref, row_outs in zip((dk_ref, dk_col_ref, dv_ref), outs):
            for i, out in enumerate(row_outs):
                ref[pl.ds(start + i * width, width), :] = out.astype(ref.dtype)
        return adjoint

    state = jnp.zeros((width, q_ref.shape[-1] * do_ref.shape[-1]), jnp.float32)
    jax.lax.fori_loop(0, layout.num_chunks, chunk, state)


def key_gradients(q, k, v, d_out, decays, *, layout: ChunkLayout, tiles: BlockSizes, interpret: bool):
    """The reverse sweep on packed inputs (q, k [B, L, H, d], v, d_out [B, L, H, dv], L =
    layout.padded_length, d and dv powers of two >= 16; decays [H, 2] float32). Returns float32
    (dk, dk_col [B, L, H, d], dv [B, L, H, dv]). One program per (batch, head, value tile, key
    tile) with the forward's tiles (`chunk_gpu.tiles_2d`); dk and dk_col are partial sums over
    value tiles, dv over key tiles, summed here."""
    if layout.variant != "2d":
        raise ValueError(f"the sweep backward is for the 2d layout, got {layout.variant!r}")
    batch, length, heads, d = q.shape
    dv = v.shape[-1]
    d_block, dv_block, num_warps = chunk_gpu.tiles_2d(layout, tiles, d, dv)
    key_tiles, value_tiles = d // d_block, dv // dv_block
    key_spec = pl.BlockSpec((None, length, None, d_block), lambda b, h, j, i: (b, 0, h, i))
    value_spec = pl.BlockSpec((None, length, None, dv_block), lambda b, h, j, i: (b, 0, h, j))
    key_out = pl.BlockSpec((None, None, length, None, d_block), lambda b, h, j, i: (j, b, 0, h, i))
    value_out = pl.BlockSpec((None, None, length, None, dv_block), lambda b, h, j, i: (i, b, 0, h, j))
    key_shape = jax.ShapeDtypeStruct((value_tiles, batch, length, heads, d), jnp.float32)
    dk, dk_col, d_v = pl.pallas_call(
        functools.partial(_sweep_kernel, layout=layout),
        out_shape=(key_shape, key_shape, jax.ShapeDtypeStruct((key_tiles, batch, length, heads, dv), jnp.float32)),
        grid=(batch, heads, value_tiles, key_tiles),
        in_specs=[pl.BlockSpec((None, 2), lambda *ids: (ids[1], 0)), key_spec, key_spec, value_spec, value_spec],
        out_specs=(key_out, key_out, value_out),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=tiles.num_stages_2d),
        interpret=interpret,
        name="lasad_2d_sweep_backward",
    )(decays, q, k, v, d_out)
    return jnp.sum(dk, axis=0), jnp.sum(dk_col, axis=0), jnp.sum(d_v, axis=0)
