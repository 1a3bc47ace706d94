"""The quadratic reference: the oracle every other LASAD algorithm is tested against.

It materialises the N x N decay matrix D(a, m) straight from docs/lasad.md §1, in float32 (float64 for
float64 inputs), and shares no decay code with the fast paths. O(N^2) time and memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lasad_reference(q, k, v, *, grid, variant, log_decay_row, log_decay_col, prefix_k=None, prefix_v=None):
    """o_a = sum_{m<a} D(a,m) (q_a.k_m) v_m + sum_p (q_a.k_p) v_p, returned in float32 (or float64).

    Inputs as `lasad_attention` (already checked); log decays are [heads] arrays.
    """
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    h, w = grid
    index = jnp.arange(h * w)
    row, col = index // w, index % w
    # Query a (first axis) minus key m (second axis).
    row_distance = (row[:, None] - row[None, :]).astype(dtype)
    col_distance = (col[:, None] - col[None, :]).astype(dtype)
    index_distance = (index[:, None] - index[None, :]).astype(dtype)
    before = index[None, :] < index[:, None]  # key m strictly before query a in raster order

    log_g_row = log_decay_row.astype(dtype)[:, None, None]
    log_g_col = log_decay_col.astype(dtype)[:, None, None]
    if variant == "2d":  # g_row^(r_a - r_m) * g_col^|c_a - c_m|
        log_decay = log_g_row * row_distance + log_g_col * jnp.abs(col_distance)
    elif variant == "2d_row":  # g_col^(c_a - c_m) in the same row, else g_row^(r_a - r_m)
        log_decay = jnp.where(row_distance == 0, log_g_col * col_distance, log_g_row * row_distance)
    elif variant == "1d":  # g^(a - m) with g = exp(log_decay_col)
        log_decay = log_g_col * index_distance
    elif variant == "none":
        log_decay = jnp.zeros_like(log_g_col * index_distance)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    decay = jnp.where(before, jnp.exp(jnp.where(before, log_decay, 0.0)), 0.0)  # [heads, N, N]

    scores = jnp.einsum("bnhd,bmhd->bhnm", q, k, precision=hi) * decay[None]
    out = jnp.einsum("bhnm,bmhe->bnhe", scores, v, precision=hi)
    if prefix_k is not None:
        prefix_scores = jnp.einsum("bnhd,bphd->bhnp", q, prefix_k.astype(dtype), precision=hi)
        out = out + jnp.einsum("bhnp,bphe->bnhe", prefix_scores, prefix_v.astype(dtype), precision=hi)
    return out
