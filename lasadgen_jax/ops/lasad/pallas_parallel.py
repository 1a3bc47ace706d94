"""LASAD in its parallel form as one fused GPU kernel (Triton lowering): `impl="pallas_parallel"`.

    o_a = sum_{m<a} D(a, m) (q_a . k_m) v_m        (no prefix: lasad_attention adds it)

computed the way flash attention computes softmax attention: tiles of queries against tiles of
keys, the decay D(a, m) = exp(log D) evaluated on chip from the two tiles' grid positions, the
N x N weights never leaving the chip. O(N^2 d) work and no states, against O(N d dv) for the
chunked kernels: at short sequences (the 16x16 and 24x24 token grids of the configs) fewer,
larger matmuls and no sequential walk win. Every variant uses the same body; only the formula of
log D and of its derivatives along the two log decays differ (`_log_decay`).

Backward, as in flash attention, two kernels: one per key tile (dk, dv and the decay gradients,
walking the query tiles after it) and one per query tile (dq, walking the key tiles before it).
With S = q k^T, dP = dO v^T and W = D * S, the gradients are

    dv = W^T dO,   dS = D * dP,   dk = dS^T q,   dq = dS k,
    d log g = sum_{a,m} (d log D(a,m) / d log g) * D * S * dP,

the last summed per key inside the kernel and over keys outside it. Nothing of size N^2 or
N d dv goes to HBM. Decays and accumulation are float32; matmul inputs keep the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lasadgen_jax.ops.lasad import common, pallas_gpu
from lasadgen_jax.ops.lasad.pallas_chunk import dot, next_power_of_two


@dataclasses.dataclass(frozen=True)
class ParallelBlocks:
    """Tiles of the parallel kernel: `block` queries x `block` keys per step (a power of two >= 16),
    Triton's num_warps and num_stages."""

    block: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"ParallelBlocks.{name} must be a power of two >= 1, got {value!r}")
        if self.block < 16:
            raise ValueError(f"ParallelBlocks.block must be >= 16 (matrix-unit tiles), got {self.block}")


def _positions(start, size: int, axis: int):
    """Token indices start ... start+size-1 as an int32 [size, 1] (axis 0) or [1, size] (axis 1)."""
    shape = (size, 1) if axis == 0 else (1, size)
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _log_decay(variant: str, width: int, query_pos, key_pos, log_row, log_col):
    """(log D, d log D / d log g_row, d log D / d log g_col) for a [bq, 1] x [1, bk] tile pair;
    None where the variant does not depend on it. Valid where key < query (callers mask)."""
    if variant == "none":
        return None, None, None
    if variant == "1d":
        distance = (query_pos - key_pos).astype(jnp.float32)
        return log_col * distance, None, distance
    d_row = (jax.lax.div(query_pos, width) - jax.lax.div(key_pos, width)).astype(jnp.float32)
    d_col = (jax.lax.rem(query_pos, width) - jax.lax.rem(key_pos, width)).astype(jnp.float32)
    if variant == "2d":
        d_col = jnp.abs(d_col)
        return log_row * d_row + log_col * d_col, d_row, d_col
    if variant == "2d_row":
        same_row = d_row == 0.0
        by_row, by_col = jnp.where(same_row, 0.0, d_row), jnp.where(same_row, d_col, 0.0)
        return log_row * by_row + log_col * by_col, by_row, by_col
    raise ValueError(f"unknown variant {variant!r}")


def _decay(variant, width, query_pos, key_pos, log_row, log_col):
    """(D with zeros where key >= query, d log D / d log g_row, ... / d log g_col) for one tile pair."""
    causal = key_pos < query_pos
    log_d, by_row, by_col = _log_decay(variant, width, query_pos, key_pos, log_row, log_col)
    if log_d is None:
        return jnp.where(causal, 1.0, 0.0), None, None
    return jnp.where(causal, jnp.exp(jnp.where(causal, log_d, 0.0)), 0.0), by_row, by_col


# ----------------------------------------------------------------------------- kernels


def _forward_kernel(decay_ref, q_ref, k_ref, v_ref, out_ref, *, variant, width, block):
    """One query tile: out = sum over key tiles j <= i of (D * q k^T) v."""
    i = pl.program_id(2)
    log_row, log_col = decay_ref[0], decay_ref[1]
    q = q_ref[...]
    query_pos = _positions(i * block, block, 0)

    def key_tile(j, acc):
        keys = pl.ds(pl.multiple_of(j * block, block), block)
        k, v = k_ref[keys, :], v_ref[keys, :]
        decay, _, _ = _decay(variant, width, query_pos, _positions(j * block, block, 1), log_row, log_col)
        weights = dot(q, k, (1, 1)) * decay
        return acc + dot(weights.astype(v.dtype), v)

    acc = jax.lax.fori_loop(0, i + 1, key_tile, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _key_grads_kernel(decay_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, drow_ref, dcol_ref, *, variant, width,
                      block, num_tiles):
    """One key tile: dk, dv and its keys' shares of the decay gradients, over query tiles i >= j."""
    j = pl.program_id(2)
    log_row, log_col = decay_ref[0], decay_ref[1]
    k, v = k_ref[...], v_ref[...]
    key_pos = _positions(j * block, block, 1)

    def query_tile(i, carry):
        dk, dv, drow, dcol = carry
        queries = pl.ds(pl.multiple_of(i * block, block), block)
        q, d_out = q_ref[queries, :], do_ref[queries, :]
        decay, by_row, by_col = _decay(variant, width, _positions(i * block, block, 0), key_pos, log_row, log_col)
        scores, d_scores = dot(q, k, (1, 1)), dot(d_out, v, (1, 1))
        dv = dv + dot((decay * scores).astype(d_out.dtype), d_out, (0, 0))
        d_weights = decay * d_scores
        dk = dk + dot(d_weights.astype(q.dtype), q, (0, 0))
        pair = d_weights * scores  # d loss / d log D(a, m)
        if by_row is not None:
            drow = drow + jnp.sum(pair * by_row, axis=0, keepdims=True)
        if by_col is not None:
            dcol = dcol + jnp.sum(pair * by_col, axis=0, keepdims=True)
        return dk, dv, drow, dcol

    zeros = lambda shape: jnp.zeros(shape, jnp.float32)
    dk, dv, drow, dcol = jax.lax.fori_loop(
        j, num_tiles, query_tile, (zeros(dk_ref.shape), zeros(dv_ref.shape), zeros((1, block)), zeros((1, block)))
    )
    dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)
    drow_ref[...], dcol_ref[...] = drow, dcol


def _query_grads_kernel(decay_ref, k_ref, v_ref, do_ref, dq_ref, *, variant, width, block):
    """One query tile: dq = sum over key tiles j <= i of (D * dO v^T) k."""
    i = pl.program_id(2)
    log_row, log_col = decay_ref[0], decay_ref[1]
    d_out = do_ref[...]
    query_pos = _positions(i * block, block, 0)

    def key_tile(j, acc):
        keys = pl.ds(pl.multiple_of(j * block, block), block)
        k, v = k_ref[keys, :], v_ref[keys, :]
        decay, _, _ = _decay(variant, width, query_pos, _positions(j * block, block, 1), log_row, log_col)
        d_weights = dot(d_out, v, (1, 1)) * decay
        return acc + dot(d_weights.astype(k.dtype), k)

    acc = jax.lax.fori_loop(0, i + 1, key_tile, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = acc.astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- calls


def _pad(x, length: int, dim: int):
    """[B, N, H, e] zero-padded to [B, length, H, dim]."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - x.shape[3])))


def _specs(length, block):
    """BlockSpecs of one tile of tokens and of the whole sequence, for a (batch, head, tile) grid."""
    tile = lambda dim: pl.BlockSpec((None, block, None, dim), lambda b, h, i: (b, i, h, 0))
    whole = lambda dim: pl.BlockSpec((None, length, None, dim), lambda b, h, i: (b, 0, h, 0))
    return tile, whole


def _prepare(q, k, v, d_out, blocks: ParallelBlocks):
    """Pads the sequence to whole tiles and head dims to powers of two >= 16."""
    length = -(-q.shape[1] // blocks.block) * blocks.block
    d, dv = next_power_of_two(max(16, q.shape[-1])), next_power_of_two(max(16, v.shape[-1]))
    padded = [_pad(q, length, d), _pad(k, length, d), _pad(v, length, dv)]
    if d_out is not None:
        padded.append(_pad(d_out, length, dv))
    return padded, length


def forward(q, k, v, decays, *, grid, variant, blocks: ParallelBlocks, interpret: bool, poison: bool = False):
    """[B, N, H, dv] in q.dtype; q, k [B, N, H, d], v [B, N, H, dv]; decays [H, 2] float32.
    poison=True (for checks) starts the output buffer as NaN, so an unwritten element shows."""
    batch, n, heads, _ = q.shape
    (q_p, k_p, v_p), length = _prepare(q, k, v, None, blocks)
    tile, whole = _specs(length, blocks.block)
    d, dv = q_p.shape[-1], v_p.shape[-1]
    out = pallas_gpu.call_with_poison(
        functools.partial(_forward_kernel, variant=variant, width=grid[1], block=blocks.block),
        (decays, q_p, k_p, v_p),
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, dv), q.dtype),
        out_spec=tile(dv),
        poison=poison,
        grid=(batch, heads, length // blocks.block),
        in_specs=[pl.BlockSpec((None, 2), lambda b, h, i: (h, 0)), tile(d), whole(d), whole(dv)],
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name=f"lasad_parallel_{variant}",
    )
    return out[:, :n, :, : v.shape[-1]]


def backward(q, k, v, decays, d_out, *, grid, variant, blocks: ParallelBlocks, interpret: bool):
    """(dq, dk, dv, d log_decay_row, d log_decay_col): dq, dk, dv in float32, decays [H] float32."""
    batch, n, heads, _ = q.shape
    (q_p, k_p, v_p, do_p), length = _prepare(q, k, v, d_out.astype(q.dtype), blocks)
    tile, whole = _specs(length, blocks.block)
    d, dv = q_p.shape[-1], v_p.shape[-1]
    tiles = length // blocks.block
    decay_spec = pl.BlockSpec((None, 2), lambda b, h, i: (h, 0))
    params = pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    per_key = pl.BlockSpec((None, None, 1, blocks.block), lambda b, h, j: (b, h, 0, j))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    dk, dv_, d_row, d_col = pl.pallas_call(
        functools.partial(_key_grads_kernel, variant=variant, width=grid[1], block=blocks.block, num_tiles=tiles),
        out_shape=[f32(batch, length, heads, d), f32(batch, length, heads, dv), f32(batch, heads, 1, length),
                   f32(batch, heads, 1, length)],
        grid=(batch, heads, tiles),
        in_specs=[decay_spec, whole(d), tile(d), tile(dv), whole(dv)],
        out_specs=[tile(d), tile(dv), per_key, per_key],
        compiler_params=params,
        interpret=interpret,
        name=f"lasad_parallel_{variant}_dkdv",
    )(decays, q_p, k_p, v_p, do_p)
    dq = pl.pallas_call(
        functools.partial(_query_grads_kernel, variant=variant, width=grid[1], block=blocks.block),
        out_shape=f32(batch, length, heads, d),
        grid=(batch, heads, tiles),
        in_specs=[decay_spec, whole(d), whole(dv), tile(dv)],
        out_specs=tile(d),
        compiler_params=params,
        interpret=interpret,
        name=f"lasad_parallel_{variant}_dq",
    )(decays, k_p, v_p, do_p)
    cut = lambda x, dim: x[:, :n, :, :dim]
    uses_row, uses_col = common.USES_DECAY[variant]
    decay_grad = lambda x, used: jnp.sum(x, axis=(0, 2, 3)) if used else jnp.zeros((heads,), jnp.float32)
    return (cut(dq, q.shape[-1]), cut(dk, q.shape[-1]), cut(dv_, v.shape[-1]),
            decay_grad(d_row, uses_row), decay_grad(d_col, uses_col))


@functools.lru_cache(maxsize=None)
def parallel_cells(interpret: bool, blocks: ParallelBlocks):
    """cells(q, k, v, log_decay_row, log_decay_col, grid, variant) -> [B, N, H, dv] in q.dtype, the
    fused parallel-form kernel with its two backward kernels; grid and variant static."""
    stack = lambda row, col: jnp.stack([row, col], axis=1).astype(jnp.float32)  # [H, 2]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def cells(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return forward(q, k, v, stack(log_decay_row, log_decay_col), grid=grid, variant=variant, blocks=blocks,
                       interpret=interpret)

    def cells_forward(q, k, v, log_decay_row, log_decay_col, grid, variant):
        out = cells(q, k, v, log_decay_row, log_decay_col, grid, variant)
        return out, (q, k, v, log_decay_row, log_decay_col)

    def cells_backward(grid, variant, residuals, d_out):
        q, k, v, log_decay_row, log_decay_col = residuals
        dq, dk, dv, d_row, d_col = backward(q, k, v, stack(log_decay_row, log_decay_col), d_out, grid=grid,
                                            variant=variant, blocks=blocks, interpret=interpret)
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
                d_row.astype(log_decay_row.dtype), d_col.astype(log_decay_col.dtype))

    cells.defvjp(cells_forward, cells_backward)
    return cells
