"""Token-by-token LASAD: the decode state, one decode step, and the `recurrent` algorithm built on them.

The state is a dict of float32 arrays, each [batch, heads, ...]; its size never depends on h:

    every variant  prefix          [B, H, d, dv]     sum of prefix k v^T (undecayed)
    none, 1d       state           [B, H, d, dv]     sum_{m<a} D(a,m) k_m v_m^T
    2d_row         vertical        [B, H, d, dv]     rows above, decayed by row distance
                   row_sum         [B, H, d, dv]     this row's k v^T so far, undecayed
                   row             [B, H, d, dv]     this row's k v^T so far, decayed along the row
    2d             columns         [B, H, w, d, dv]  per column c: rows above, g_row^dr g_col^|dc|
                   row_kv          [B, H, w, d, dv]  this row's k v^T by column, held for the fold
                   row             [B, H, d, dv]     this row's k v^T so far, decayed along the row

A step for cell a folds the key/value of cell a-1 (the token the model just fed in), then reads
the state with the query for cell a. When a-1 ends a row, `2d` folds the finished row into the
column states with a two-sided exponential smoothing along the row (one w x w matmul, once per row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasadgen_jax.ops.lasad import common


def init_state(batch: int, heads: int, d: int, dv: int, *, grid, variant: str) -> dict:
    """An empty decode state (no prefix, no tokens) in float32."""
    _, w = common.check_grid(grid)
    common.check_variant(variant)
    matrix = jnp.zeros((batch, heads, d, dv), jnp.float32)
    if variant in ("none", "1d"):
        return {"prefix": matrix, "state": matrix}
    if variant == "2d_row":
        return {"prefix": matrix, "vertical": matrix, "row_sum": matrix, "row": matrix}
    columns = jnp.zeros((batch, heads, w, d, dv), jnp.float32)
    return {"prefix": matrix, "columns": columns, "row_kv": columns, "row": matrix}


def fold_prefix(state: dict, prefix_k, prefix_v) -> dict:
    """Adds prefix keys/values [batch, P, heads, d|dv] to the state; every later query sees them."""
    return {**state, "prefix": state["prefix"] + common.prefix_state(prefix_k, prefix_v)}


def decode_step(state: dict, q, k_prev, v_prev, cell, *, grid, variant, log_decay_row, log_decay_col,
                row_start: bool | None = None):
    """One decode step for the query of `cell` (a scalar raster index, may be traced).

    q: [batch, heads, d], the query that predicts `cell`. k_prev, v_prev: [batch, heads, d|dv], the
    key and value of cell-1; ignored when cell == 0. log decays: [heads], None where unused.
    row_start: whether `cell` starts a row (cell % w == 0), when the caller knows it statically; the
    2D variants then skip the per-token lax.cond between the row fold and the in-row update.
    None decides at run time. Returns (output [batch, heads, dv] in float32, new state).
    """
    _, w = common.check_grid(grid)
    common.check_variant(variant)
    log_decay_row, log_decay_col = common.check_log_decays(variant, log_decay_row, log_decay_col, q.shape[1])
    dtype = q.dtype
    kv = common.mm("bhd,bhe->bhde", k_prev, v_prev, dtype) * (cell > 0)
    g_row = jnp.exp(log_decay_row)[None, :, None, None]
    g_col = jnp.exp(log_decay_col)[None, :, None, None]
    col = cell % w
    if variant == "none":
        state = {**state, "state": state["state"] + kv}
        read = [state["state"]]
    elif variant == "1d":
        state = {**state, "state": g_col * (state["state"] + kv)}
        read = [state["state"]]
    elif variant == "2d_row":
        new_row = lambda s: _2d_row_new_row(s, kv, g_row)
        same_row = lambda s: _2d_row_same_row(s, kv, g_col)
        state = _row_branch(row_start, col, new_row, same_row, state)
        read = [state["vertical"], state["row"]]
    elif variant == "2d":
        new_row = lambda s: _2d_new_row(s, kv, g_row, log_decay_col)
        same_row = lambda s: _2d_same_row(s, kv, g_col, col)
        state = _row_branch(row_start, col, new_row, same_row, state)
        read = [jax.lax.dynamic_index_in_dim(state["columns"], col, axis=2, keepdims=False), state["row"]]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    # Each float32 state is read once, in place: no summed or bf16 copy of it (decoding is bound by
    # the bytes of the state, and a one-row matmul gains nothing from bf16 inputs).
    acc = common.accumulation_dtype(dtype)
    out = sum(
        jnp.einsum("bhd,bhde->bhe", q.astype(acc), part, precision=jax.lax.Precision.HIGHEST)
        for part in read + [state["prefix"]]
    )
    return out, state


def _row_branch(row_start, col, new_row, same_row, state):
    """new_row(state) at a row start, else same_row(state); a lax.cond only when not known statically."""
    if row_start is None:
        return jax.lax.cond(col == 0, new_row, same_row, state)
    return new_row(state) if row_start else same_row(state)


def _2d_row_same_row(state, kv, g_col):
    return {**state, "row_sum": state["row_sum"] + kv, "row": g_col * (state["row"] + kv)}


def _2d_row_new_row(state, kv, g_row):
    # cell-1 ended its row: the finished row moves into the vertical state
    zeros = jnp.zeros_like(state["row"])
    vertical = g_row * (state["vertical"] + state["row_sum"] + kv)
    return {**state, "vertical": vertical, "row_sum": zeros, "row": zeros}


def _2d_same_row(state, kv, g_col, col):
    row_kv = jax.lax.dynamic_update_index_in_dim(state["row_kv"], kv, col - 1, axis=2)
    return {**state, "row_kv": row_kv, "row": g_col * (state["row"] + kv)}


def _2d_new_row(state, kv, g_row, log_decay_col):
    w = state["row_kv"].shape[2]
    finished_row = state["row_kv"].at[:, :, w - 1].set(kv)
    smoothed = common.two_sided_smooth(finished_row, log_decay_col, axis=2, head_axis=1)
    columns = g_row[:, :, None] * (state["columns"] + smoothed)
    return {**state, "columns": columns, "row_kv": jnp.zeros_like(finished_row), "row": jnp.zeros_like(state["row"])}


def recurrent_cells(q, k, v, log_decay_row, log_decay_col, *, grid, variant):
    """The `recurrent` algorithm: decode_step over every cell in a lax.scan. Float32 [B, N, H, dv]."""
    batch, _, heads, d = q.shape
    state = init_state(batch, heads, d, v.shape[-1], grid=grid, variant=variant)
    # Step a reads q[a] and folds k[a-1], v[a-1] (zeros at a = 0, where the step ignores them).
    k_prev = jnp.pad(k, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
    v_prev = jnp.pad(v, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]

    def step(state, inputs):
        cell, q_a, k_a, v_a = inputs
        out, state = decode_step(
            state, q_a, k_a, v_a, cell,
            grid=grid, variant=variant, log_decay_row=log_decay_row, log_decay_col=log_decay_col,
        )
        return state, out

    time_major = lambda x: jnp.swapaxes(x, 0, 1)
    cells = jnp.arange(q.shape[1])
    _, out = jax.lax.scan(step, state, (cells, time_major(q), time_major(k_prev), time_major(v_prev)))
    return time_major(out)
