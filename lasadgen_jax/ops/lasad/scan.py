"""The `scan` algorithm: every token's state at once, by associative scans over rows and along rows.

It materialises k_m v_m^T for every token ([B, h, w, H, d, dv]), so it costs O(N d dv) memory; in
exchange it has O(log h + log w) depth. Useful as a parallel formulation to test against and for
short sequences; the chunked algorithm is the training path.
"""

from __future__ import annotations

import jax.numpy as jnp

from lasadgen_jax.ops.lasad import common


def scan_cells(q, k, v, log_decay_row, log_decay_col, *, grid, variant):
    """Float32 [B, N, H, dv] for the cell part of LASAD (no prefix)."""
    h, w = grid
    batch, n, heads, _ = q.shape
    kv = common.mm("bnhd,bnhe->bnhde", k, v, q.dtype)  # [B, N, H, d, dv]
    # Per-head decays broadcast against [..., H, d, dv].
    log_g_row = log_decay_row[:, None, None]
    log_g_col = log_decay_col[:, None, None]
    if variant == "none":
        states = common.exclusive_decayed_cumsum(kv, jnp.zeros_like(log_g_col), axis=1)
    elif variant == "1d":
        states = common.exclusive_decayed_cumsum(kv, log_g_col, axis=1)
    else:
        kv = kv.reshape(batch, h, w, *kv.shape[2:])  # [B, h, w, H, d, dv]
        # Earlier tokens of the same row, decayed along the row.
        row = common.exclusive_decayed_cumsum(kv, log_g_col, axis=2)
        if variant == "2d_row":  # rows above: each row's sum, decayed by row distance
            vertical = common.exclusive_decayed_cumsum(kv.sum(axis=2), log_g_row, axis=1)[:, :, None]
        else:  # 2d: rows above, smoothed two-sidedly along their row, then decayed by row distance
            smoothed = common.two_sided_smooth(kv, log_decay_col, axis=2, head_axis=3)
            vertical = common.exclusive_decayed_cumsum(smoothed, log_g_row, axis=1)
        states = (row + vertical).reshape(batch, n, *kv.shape[3:])
    return common.mm("bnhd,bnhde->bnhe", q, states, q.dtype)
