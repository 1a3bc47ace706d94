"""The `parallel` algorithm: LASAD's quadratic form in plain XLA, with a backward that stores nothing.

    out = ((q k^T) * D) v          D[h, a, m] = exp(log D(a, m)) for m < a, else 0

Per layer it does O(N^2 d) work in a few large matmuls and no sequential steps, against the
`chunked` algorithm's scan over blocks with its states: at short sequences (the CPU demo's 8x8
grid, 16x16) that is the faster form; `chunked` wins as N grows (benchmarks/RESULTS.md, "CPU: the
`parallel` algorithm against `chunked`, for `auto`"). The Pallas kernel of impl="pallas_parallel"
(kernels/parallel_form.py) computes the same form without the N x N arrays in HBM.

Backward (a custom_vjp, so nothing N x N is kept between the passes): with S = q k^T,
dP = dO v^T and dS = D * dP,

    dv = (D * S)^T dO,  dq = dS k,  dk = dS^T q,  d log g = sum_{a,m} (d log D / d log g) * dS * S.

Decays and accumulation float32; matmul inputs in the input dtype (common.mm).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lasadgen_jax.ops.lasad import common


def pair_terms(variant: str, grid, log_decay_row, log_decay_col):
    """(D float32, [H, N, N] or [N, N] for `none`, zero where m >= a; d log D / d log g_row [N, N]
    or None; ... / d log g_col [N, N] or None), queries on the first axis, keys on the second."""
    h, w = grid
    index = jnp.arange(h * w, dtype=jnp.int32)
    query_pos, key_pos = index[:, None], index[None, :]
    causal = key_pos < query_pos
    log_decay, by_row, by_col = common.pair_log_decay(
        variant, w, query_pos, key_pos, log_decay_row[:, None, None], log_decay_col[:, None, None]
    )
    if log_decay is None:
        return jnp.where(causal, 1.0, 0.0), None, None
    return common.masked_decay(log_decay, causal), by_row, by_col


def _forward(q, k, v, log_decay_row, log_decay_col, grid, variant):
    decay, _, _ = pair_terms(variant, grid, log_decay_row, log_decay_col)
    weights = common.mm("bnhd,bmhd->bhnm", q, k, q.dtype) * decay
    return common.mm("bhnm,bmhe->bnhe", weights, v, q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def parallel_cells(q, k, v, log_decay_row, log_decay_col, grid, variant):
    """Float32 [B, N, H, dv]: the cell part of LASAD (no prefix). grid and variant are static."""
    return _forward(q, k, v, log_decay_row, log_decay_col, grid, variant)


def _parallel_forward(q, k, v, log_decay_row, log_decay_col, grid, variant):
    out = _forward(q, k, v, log_decay_row, log_decay_col, grid, variant)
    return out, (q, k, v, log_decay_row, log_decay_col)


def _parallel_backward(grid, variant, residuals, d_out):
    q, k, v, log_decay_row, log_decay_col = residuals
    dtype = q.dtype
    d_out = d_out.astype(dtype)  # the op returns q.dtype: d_out holds no more precision
    decay, by_row, by_col = pair_terms(variant, grid, log_decay_row, log_decay_col)
    scores = common.mm("bnhd,bmhd->bhnm", q, k, dtype)
    d_scores = decay * common.mm("bnhe,bmhe->bhnm", d_out, v, dtype)
    dv = common.mm("bhnm,bnhe->bmhe", decay * scores, d_out, dtype)
    dq = common.mm("bhnm,bmhd->bnhd", d_scores, k, dtype)
    dk = common.mm("bhnm,bnhd->bmhd", d_scores, q, dtype)
    pair = d_scores * scores  # d loss / d log D(a, m)
    hi = jax.lax.Precision.HIGHEST
    decay_grad = lambda factor, like: (
        jnp.zeros_like(like) if factor is None
        else jnp.einsum("bhnm,nm->h", pair, factor, precision=hi).astype(like.dtype)
    )
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            decay_grad(by_row, log_decay_row), decay_grad(by_col, log_decay_col))


parallel_cells.defvjp(_parallel_forward, _parallel_backward)
