"""The arithmetic of one row chunk of the linear-time `2d` kernel, forward and reverse sweep
(docs/lasad.md §8), written once on Pallas refs for both bodies (linear_2d_tpu.py, linear_2d_gpu.py).

A chunk is R whole rows of the packed `2d` layout (`ChunkLayout`, rows padded to wp slots, so the
token of local row i, column c sits at slot i*wp + c). The refs hold the chunk from slot `base`
on (TPU: the chunk's own block, base 0; GPU: the whole sequence, base = chunk * T). Column c's R
tokens are read with one strided slice (stride wp). Every product accumulates in float32; the
column states and adjoints are float32 [w, d, dv_tile] refs (VMEM scratch on TPU, a per-program
HBM buffer on GPU) and enter matmuls rounded to the input dtype, as the other kernels do.

`barrier` orders a program's own stores before its later loads of the same elements: a no-op on
TPU and in interpret mode, a thread-block barrier on GPU (Triton does not order global memory
between threads of one program).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lasadgen_jax.ops.lasad.chunk_math import dot


@dataclasses.dataclass(frozen=True)
class ChunkGeometry:
    """Static sizes of one chunk: R rows of wp slots, of which the first `width` (w) are cells."""

    rows: int
    row_slots: int
    width: int
    min_matmul_dim: int = 1  # column products with a smaller dim are summed elementwise (Triton: 16)


def _row_pair_decay(geometry: ChunkGeometry, query_row, key_row, log_row, log_col):
    """([wp, wp] D(a, m) for queries of local row `query_row` and keys of `key_row` <= it, zero
    unless m is before a; [wp, wp] |c_a - c_m|), float32; rows may be traced scalars."""
    shape = (geometry.row_slots, geometry.row_slots)
    query_col = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    key_col = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    col_distance = jnp.abs(query_col - key_col).astype(jnp.float32)
    row_distance = (query_row - key_row).astype(jnp.float32)
    before = (key_row < query_row) | (key_col < query_col)
    log_decay = log_row * row_distance + log_col * col_distance
    return jnp.where(before, jnp.exp(jnp.where(before, log_decay, 0.0)), 0.0), col_distance


def _row(ref, base, geometry: ChunkGeometry, i):
    """[wp, e]: local row i of the chunk."""
    return ref[pl.ds(base + i * geometry.row_slots, geometry.row_slots), :]


def _column(geometry: ChunkGeometry, base, c):
    """The strided slice of column c's R tokens."""
    return pl.ds(base + c, geometry.rows, stride=geometry.row_slots)


def _row_steps(geometry: ChunkGeometry):
    """[R, 1] float32: each local row's index i."""
    return jax.lax.broadcasted_iota(jnp.int32, (geometry.rows, 1), 0).astype(jnp.float32)


def _matmul_input(x, dtype):
    return x.astype(dtype)


def _column_dot(geometry: ChunkGeometry, a, b, contract=(1, 0)):
    """`dot` for the per-column products (one dim is R); where a dim is below the lowering's
    matrix-unit minimum (Triton: 16) a float32 broadcast product summed over the contracted dim."""
    sizes = (a.shape[1 - contract[0]], a.shape[contract[0]], b.shape[1 - contract[1]])
    if min(sizes) >= geometry.min_matmul_dim:
        return dot(a, b, contract)
    a = (a if contract[0] == 1 else a.T).astype(jnp.float32)  # [M, K]
    b = (b if contract[1] == 0 else b.T).astype(jnp.float32)  # [K, N]
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)


def forward_chunk(refs, previous_refs, state_ref, bases, chunk, log_row, log_col, *, geometry: ChunkGeometry,
                  barrier):
    """One chunk of the forward: out (float32, the chunk's rows of out_ref) and the column states.

    refs: (q, k, v, out) from slot bases[0]; q, k [*, d], v and out [*, dv_tile]. previous_refs:
    (k, v) of the previous chunk from slot bases[1] (any chunk for chunk 0: its keys are not used).
    state_ref [w, d, dv_tile] float32 holds, for chunk j, the column states C_j (rows above the
    chunk, decayed to its first row) less one half of the previous chunk's row fold: the fold
    C_j[c] = g_row^R C_(j-1)[c] + sum_c' g_col^|c - c'| X_(j-1)[c'],
    X[c] = sum_i g_row^(R - i) k_(i,c) v_(i,c)^T, is split into the columns visited up to c
    (included) in chunk j-1's pass and those after, and each chunk's one pass over the columns
    walks them in the other direction than the last (ascending for even chunks): it adds the
    previous chunk's missing half as it goes, and leaves its own second half to the next chunk.
    So each state is read and written once per chunk. Two steps:
      1. within the chunk, per query row i and key row j <= i: out_i += (q_i k_j^T * D) v_j;
      2. the columns in this chunk's order, with `missing` the previous chunk's X summed over the
         columns already visited (decayed to c) and `own` this chunk's, c included:
           C = state[c] + missing,  out[:, c] += g_row^i q[:, c] C,
           own <- g_col own + X_j[c],  state[c] <- g_row^R C + own,
           missing <- g_col (missing + X_(j-1)[c]).
    """
    q_ref, k_ref, v_ref, out_ref = refs
    base, previous_base = bases
    dtype = q_ref.dtype
    rows = geometry.rows

    def query_row(i, carry):
        q_i = _row(q_ref, base, geometry, i)

        def key_row(j, acc):
            decay, _ = _row_pair_decay(geometry, i, j, log_row, log_col)
            scores = dot(q_i, _row(k_ref, base, geometry, j), (1, 1)) * decay
            return acc + dot(scores.astype(dtype), _row(v_ref, base, geometry, j))

        acc = jax.lax.fori_loop(0, i + 1, key_row, jnp.zeros((geometry.row_slots, out_ref.shape[-1]), jnp.float32))
        out_ref[pl.ds(base + i * geometry.row_slots, geometry.row_slots), :] = acc.astype(out_ref.dtype)
        return carry

    jax.lax.fori_loop(0, rows, query_row, 0)
    barrier()
    steps = _row_steps(geometry)
    query_weight = jnp.exp(log_row * steps)  # [R, 1]
    key_weight = jnp.exp(log_row * (rows - steps))
    chunk_decay = jnp.exp(log_row * rows)
    g_col = jnp.exp(log_col)
    has_previous = jnp.minimum(chunk, 1).astype(jnp.float32)
    descending = jax.lax.rem(chunk, 2)  # 1 for odd chunks (integer arithmetic: no boolean select in Triton)

    def column_fold(key_ref, value_ref, start, c):
        keys = (key_ref[_column(geometry, start, c), :].astype(jnp.float32) * key_weight).astype(dtype)
        return _column_dot(geometry, keys, value_ref[_column(geometry, start, c), :], (0, 0))  # [d, dv_tile]

    def column(t, sums):
        missing, own = sums
        c = t + descending * (geometry.width - 1 - 2 * t)
        state = state_ref[c] + missing
        read = _column_dot(geometry, q_ref[_column(geometry, base, c), :], _matmul_input(state, dtype)) * query_weight
        out_ref[_column(geometry, base, c), :] += read.astype(out_ref.dtype)
        own = g_col * own + column_fold(k_ref, v_ref, base, c)
        state_ref[c] = chunk_decay * state + own
        previous = column_fold(*previous_refs, previous_base, c)
        return g_col * (missing + has_previous * previous), own

    zero = jnp.zeros(state_ref.shape[1:], jnp.float32)
    jax.lax.fori_loop(0, geometry.width, column, (zero, zero))
    barrier()


def backward_chunk(refs, adjoint_refs, base, log_row, log_col, *, geometry: ChunkGeometry, barrier):
    """One chunk of the reverse sweep: dk (a partial sum over value tiles), dv, and this chunk's
    keys' shares of dL/dlog g_row and dL/dlog g_col as [1, 1] float32 arrays.

    refs: (q, k, v, do, dk, dv); q, k, dk [*, d], v, do, dv [*, dv_tile]; dk, dv float32.
    adjoint_refs: (A, A_row) [w, d, dv_tile] float32, on entry for the chunk's end r1 = r0 + R:
        A[c]     = sum_(a later, c_a = c) g_row^(r_a - r1) q_a do_a^T                (dL/dC)
        A_row[c] = sum_(a later, c_a = c) (r_a - r1) g_row^(r_a - r1) q_a do_a^T     (its d/dlog g_row)
    and left for the chunk's start. A key m in row i, column c' meets the later queries through
    g_row^(R - i) (W A)[c'], W = g_col^|c - c'|, and the pair exponents split as
    r_a - r_m = (r_a - r1) + (R - i) and |c - c'|, so both decay gradients come out pair-exact:
        dk_m += g^(R-i) (W A)[c'] v_m,  dv_m += g^(R-i) (W A)[c']^T k_m,
        dlog g_col += g^(R-i) k_m . ((|c - c'| W) A)[c'] v_m,
        dlog g_row += g^(R-i) k_m . ((W A_row)[c'] + (R - i) (W A)[c']) v_m.
    W A and (|c - c'| W) A are formed by two one-sided scans over the columns (left: c <= c',
    ascending; right: c > c', descending), each carrying three [d, dv_tile] sums.
    """
    q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref = refs
    adjoint_ref, adjoint_row_ref = adjoint_refs
    dtype = q_ref.dtype
    rows = geometry.rows
    zero11 = jnp.zeros((1, 1), jnp.float32)
    total = lambda x: jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)

    def key_row(j, sums):
        k_j, v_j = _row(k_ref, base, geometry, j), _row(v_ref, base, geometry, j)

        def query_row(i, carry):
            dk, dv, d_row, d_col = carry
            q_i, do_i = _row(q_ref, base, geometry, i), _row(do_ref, base, geometry, i)
            decay, col_distance = _row_pair_decay(geometry, i, j, log_row, log_col)
            scores = dot(q_i, k_j, (1, 1)) * decay  # [wp queries, wp keys]
            do_v = dot(do_i, v_j, (1, 1))
            dv = dv + dot(scores.astype(dtype), do_i, (0, 0))
            dk = dk + dot((do_v * decay).astype(dtype), q_i, (0, 0))
            pair = scores * do_v  # dL/dlog D(a, m)
            d_row = d_row + (i - j).astype(jnp.float32) * total(pair)
            return dk, dv, d_row, d_col + total(pair * col_distance)

        slots = geometry.row_slots
        start = (jnp.zeros((slots, dk_ref.shape[-1]), jnp.float32), jnp.zeros((slots, dv_ref.shape[-1]), jnp.float32))
        dk, dv, d_row, d_col = jax.lax.fori_loop(j, rows, query_row, (*start, *sums))
        dk_ref[pl.ds(base + j * slots, slots), :] = dk
        dv_ref[pl.ds(base + j * slots, slots), :] = dv
        return d_row, d_col

    sums = jax.lax.fori_loop(0, rows, key_row, (zero11, zero11))
    barrier()
    steps = _row_steps(geometry)
    key_weight = jnp.exp(log_row * (rows - steps))  # [R, 1]
    g_col = jnp.exp(log_col)

    def cross(c, smoothed, smoothed_col, smoothed_row, sums):
        """Column c's keys against the later queries, through the smoothed adjoints."""
        d_row, d_col = sums
        k_c, v_c = k_ref[_column(geometry, base, c), :], v_ref[_column(geometry, base, c), :]
        k32 = k_c.astype(jnp.float32)
        dk = _column_dot(geometry, v_c, _matmul_input(smoothed, dtype), (1, 1)) * key_weight  # [R, d]
        dv = _column_dot(geometry, k_c, _matmul_input(smoothed, dtype)) * key_weight  # [R, dv_tile]
        by_col = _column_dot(geometry, v_c, _matmul_input(smoothed_col, dtype), (1, 1)) * key_weight
        by_row = (_column_dot(geometry, v_c, _matmul_input(smoothed_row, dtype), (1, 1)) * key_weight
                  + (rows - steps) * dk)
        dk_ref[_column(geometry, base, c), :] += dk
        dv_ref[_column(geometry, base, c), :] += dv
        return d_row + total(k32 * by_row), d_col + total(k32 * by_col)

    def left(c, carry):
        below, below_col, below_row, sums = carry  # sums over columns < c, decayed to c - 1
        adjoint = adjoint_ref[c]
        below_col = g_col * (below_col + below)
        below = g_col * below + adjoint
        below_row = g_col * below_row + adjoint_row_ref[c]
        return below, below_col, below_row, cross(c, below, below_col, below_row, sums)

    zero = jnp.zeros(adjoint_ref.shape[1:], jnp.float32)
    *_, sums = jax.lax.fori_loop(0, geometry.width, left, (zero, zero, zero, sums))
    barrier()
    chunk_decay = jnp.exp(log_row * rows)
    query_weight = jnp.exp(log_row * steps)

    def right(t, carry):
        above, above_col, above_row, sums = carry  # sums over columns > c, decayed to c
        c = geometry.width - 1 - t
        sums = cross(c, above, above_col, above_row, sums)
        adjoint, adjoint_row = adjoint_ref[c], adjoint_row_ref[c]
        above_col = g_col * (above_col + above + adjoint)
        above = g_col * (above + adjoint)
        above_row = g_col * (above_row + adjoint_row)
        q_c, do_c = q_ref[_column(geometry, base, c), :].astype(jnp.float32), do_ref[_column(geometry, base, c), :]
        reads = _column_dot(geometry, (q_c * query_weight).astype(dtype), do_c, (0, 0))
        reads_row = _column_dot(geometry, (q_c * (steps * query_weight)).astype(dtype), do_c, (0, 0))
        adjoint_ref[c] = chunk_decay * adjoint + reads
        adjoint_row_ref[c] = chunk_decay * (adjoint_row + rows * adjoint) + reads_row
        return above, above_col, above_row, sums

    *_, sums = jax.lax.fori_loop(0, geometry.width, right, (zero, zero, zero, sums))
    barrier()
    return sums
