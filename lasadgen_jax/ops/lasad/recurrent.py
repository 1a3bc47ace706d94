"""Token-by-token LASAD: the decode state, one decode step, and the `recurrent` algorithm built on them.

The state is a dict of arrays, each [batch, heads, ...], stored in `state_dtype` (float32 by
default, or bfloat16) and always updated in float32; its size never depends on h:

    every variant  prefix          [B, H, d, dv]     sum of prefix k v^T (undecayed), or, when the
                                                     state is made for a short prefix (below):
                   prefix_k        [B, H, Sp, d]     the prefix keys, Sp = next power of two >= P
                   prefix_v        [B, H, Sp, dv]    the prefix values (slots past P zero)
    none, 1d       state           [B, H, d, dv]     sum_{m<a} D(a,m) k_m v_m^T
    2d_row         vertical        [B, H, d, dv]     rows above, decayed by row distance
                   row_sum         [B, H, d, dv]     this row's k v^T so far, undecayed
                   row             [B, H, d, dv]     this row's k v^T so far, decayed along the row
    2d             columns         [B, H, w, d, dv]  per column c: rows above, g_row^dr g_col^|dc|
                   row_k           [B, H, S, d]      this row's keys by column (slot c = column c)
                   row_v           [B, H, S, dv]     this row's values by column

init_state(num_prefix=P) keeps the prefix as its Sp keys and values when that is smaller than one
d x dv matrix (the class prefix, P = 1: 2 (d + dv) numbers instead of d dv), and fold_prefix then
fills those slots (once); without num_prefix it keeps the matrix and fold_prefix adds to it.
S = row_slots(w) >= w: the power of two >= max(w, 16), so that a kernel can load the row as one
[S, d] tile; slots >= w stay zero. A slot holds a key from the step after its token until the row
ends; slots at or past the query's column are stale (last row's) and never read.

A step for cell a folds the key/value of cell a-1 (the token the model just fed in), then reads
the state with the query for cell a. In `2d` a step inside a row only writes one key and one value
slot and reads one column state; the row part of the read comes from the key/value slots,
sum_{c'<c} g_col^(c-c') (q . k_c') v_c'. When a-1 ends a row, the finished row is folded into
every column state at once: C[c] <- g_row (C[c] + K^T diag(g_col^|c - c'|) V), one [S, d]^T x
[S, dv] matmul per column, once per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasadgen_jax.ops.lasad import common

STATE_DTYPES = ("float32", "bfloat16")


def row_slots(width: int) -> int:
    """Key/value slots of the `2d` row: the power of two >= max(width, 16)."""
    return max(16, 1 << (width - 1).bit_length())


def check_state_dtype(state_dtype) -> jnp.dtype:
    """The storage dtype of a decode state (float32 or bfloat16), or a ValueError naming the choices."""
    try:
        dtype = jnp.dtype(state_dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    return dtype


def prefix_slots(num_prefix: int, d: int, dv: int) -> int:
    """Key/value slots of a prefix kept as vectors (the power of two >= num_prefix), or 0 when the
    d x dv matrix is smaller (or there is no prefix)."""
    if num_prefix < 1:
        return 0
    slots = 1 << (num_prefix - 1).bit_length()
    return slots if slots * (d + dv) < d * dv else 0


def init_state(batch: int, heads: int, d: int, dv: int, *, grid, variant: str, state_dtype="float32",
               num_prefix: int = 0) -> dict:
    """An empty decode state (no prefix, no tokens), stored in state_dtype. num_prefix: the prefix length
    fold_prefix will bring, when known: a short prefix is then kept as vectors (module docstring)."""
    _, w = common.check_grid(grid)
    common.check_variant(variant)
    dtype = check_state_dtype(state_dtype)
    if int(num_prefix) != num_prefix or num_prefix < 0:
        raise ValueError(f"num_prefix must be an int >= 0, got {num_prefix!r}")
    matrix = jnp.zeros((batch, heads, d, dv), dtype)
    slots_p = prefix_slots(num_prefix, d, dv)
    if slots_p:
        prefix = {"prefix_k": jnp.zeros((batch, heads, slots_p, d), dtype),
                  "prefix_v": jnp.zeros((batch, heads, slots_p, dv), dtype)}
    else:
        prefix = {"prefix": matrix}
    if variant in ("none", "1d"):
        return {**prefix, "state": matrix}
    if variant == "2d_row":
        return {**prefix, "vertical": matrix, "row_sum": matrix, "row": matrix}
    slots = row_slots(w)
    return {
        **prefix,
        "columns": jnp.zeros((batch, heads, w, d, dv), dtype),
        "row_k": jnp.zeros((batch, heads, slots, d), dtype),
        "row_v": jnp.zeros((batch, heads, slots, dv), dtype),
    }


def fold_prefix(state: dict, prefix_k, prefix_v) -> dict:
    """Adds prefix keys/values [batch, P, heads, d|dv] to the state; every later query sees them.

    A state made with init_state(num_prefix=P) keeps a prefix of P positions in its slots (taken once:
    the slots are set, not added to); a prefix of another length turns its prefix into the matrix
    (the slots' k v^T plus the new prefix's), as a state made without num_prefix keeps it.
    """
    if "prefix" not in state:
        slots, length = state["prefix_k"].shape[2], prefix_k.shape[1]
        if prefix_slots(length, prefix_k.shape[-1], prefix_v.shape[-1]) == slots:
            pad = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, slots - length), (0, 0)))
            return {**state, "prefix_k": pad(prefix_k).astype(state["prefix_k"].dtype),
                    "prefix_v": pad(prefix_v).astype(state["prefix_v"].dtype)}
        held = common.mm("bhsd,bhse->bhde", state["prefix_k"], state["prefix_v"], jnp.float32)
        stored_dtype = state["prefix_k"].dtype
        state = {key: value for key, value in state.items() if key not in ("prefix_k", "prefix_v")}
        state["prefix"] = held.astype(stored_dtype)
    prefix = state["prefix"].astype(jnp.float32) + common.prefix_state(prefix_k, prefix_v)
    return {**state, "prefix": prefix.astype(state["prefix"].dtype)}


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
    f32 = lambda x: x.astype(jnp.float32)
    stored = lambda x, like: x.astype(like.dtype)
    kv = common.mm("bhd,bhe->bhde", k_prev, v_prev, dtype) * (cell > 0)
    g_row = jnp.exp(log_decay_row)[None, :, None, None]
    g_col = jnp.exp(log_decay_col)[None, :, None, None]
    col = cell % w
    if variant == "none":
        state = {**state, "state": stored(f32(state["state"]) + kv, state["state"])}
        read = [state["state"]]
    elif variant == "1d":
        state = {**state, "state": stored(g_col * (f32(state["state"]) + kv), state["state"])}
        read = [state["state"]]
    elif variant == "2d_row":
        new_row = lambda s: _2d_row_new_row(s, kv, g_row)
        same_row = lambda s: _2d_row_same_row(s, kv, g_col)
        state = _row_branch(row_start, col, new_row, same_row, state)
        read = [state["vertical"], state["row"]]
    elif variant == "2d":
        k_prev, v_prev = k_prev * (cell > 0), v_prev * (cell > 0)
        new_row = lambda s: _2d_new_row(s, k_prev, v_prev, log_decay_row, log_decay_col, dtype)
        same_row = lambda s: _2d_same_row(s, k_prev, v_prev, col)
        state = _row_branch(row_start, col, new_row, same_row, state)
        read = [jax.lax.dynamic_index_in_dim(state["columns"], col, axis=2, keepdims=False)]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    # Each state is read once, in place, in float32 (decoding is bound by the bytes of the state, and
    # a one-row matmul gains nothing from bf16 inputs).
    acc = common.accumulation_dtype(dtype)
    out = sum(
        jnp.einsum("bhd,bhde->bhe", q.astype(acc), part.astype(acc), precision=jax.lax.Precision.HIGHEST)
        for part in read + ([state["prefix"]] if "prefix" in state else [])
    )
    if "prefix_k" in state:
        out = out + slots_read(q.astype(acc), state["prefix_k"], state["prefix_v"], None)
    if variant == "2d":
        out = out + row_read(q.astype(acc), state["row_k"], state["row_v"], col, log_decay_col)
    return out, state


def row_read(q, row_k, row_v, col, log_decay_col):
    """sum_{c' < col} g_col^(col - c') (q . k_c') v_c' over the row's key/value slots: [batch, heads, dv]."""
    slot = jnp.arange(row_k.shape[2])
    weights = jnp.where(slot < col, jnp.exp(log_decay_col[:, None] * (col - slot)), 0.0)  # [heads, S]
    return slots_read(q, row_k, row_v, weights)


def slots_read(q, keys, values, weights):
    """sum_s weights[h, s] (q . k_s) v_s over key/value slots [batch, heads, S, d|dv] (weights None: 1)."""
    scores = jnp.einsum("bhd,bhsd->bhs", q, keys.astype(q.dtype), precision=jax.lax.Precision.HIGHEST)
    scores = scores if weights is None else scores * weights
    return jnp.einsum("bhs,bhse->bhe", scores, values.astype(q.dtype), precision=jax.lax.Precision.HIGHEST)


def row_fold_weights(width: int, slots: int, log_decay_col):
    """[heads, width, S]: g_col^|c - c'| for column c and slot c' < width, zero for the padding slots."""
    column = jnp.arange(width)[:, None]
    slot = jnp.arange(slots)[None, :]
    weights = jnp.exp(log_decay_col[:, None, None] * jnp.abs(column - slot))
    return jnp.where(slot < width, weights, 0.0)


def _row_branch(row_start, col, new_row, same_row, state):
    """new_row(state) at a row start, else same_row(state); a lax.cond only when not known statically."""
    if row_start is None:
        return jax.lax.cond(col == 0, new_row, same_row, state)
    return new_row(state) if row_start else same_row(state)


def _2d_row_same_row(state, kv, g_col):
    row_sum = state["row_sum"].astype(jnp.float32) + kv
    row = g_col * (state["row"].astype(jnp.float32) + kv)
    return {**state, "row_sum": row_sum.astype(state["row_sum"].dtype), "row": row.astype(state["row"].dtype)}


def _2d_row_new_row(state, kv, g_row):
    # cell-1 ended its row: the finished row moves into the vertical state
    zeros = jnp.zeros_like(state["row"])
    vertical = g_row * (state["vertical"].astype(jnp.float32) + state["row_sum"].astype(jnp.float32) + kv)
    return {**state, "vertical": vertical.astype(state["vertical"].dtype), "row_sum": zeros, "row": zeros}


def _2d_same_row(state, k_prev, v_prev, col):
    # cell-1 = column col-1 of this row: its key and value go to their slots, nothing else changes
    put = lambda slots, x: jax.lax.dynamic_update_index_in_dim(slots, x.astype(slots.dtype), col - 1, axis=2)
    return {**state, "row_k": put(state["row_k"], k_prev), "row_v": put(state["row_v"], v_prev)}


def _2d_new_row(state, k_prev, v_prev, log_decay_row, log_decay_col, dtype):
    # cell-1 ended its row (column w-1): every column state takes the finished row, smoothed along it.
    # The slots keep their stale keys: the next row overwrites them before any query reads them.
    columns = state["columns"]
    w, slots = columns.shape[2], state["row_k"].shape[2]
    last = jnp.arange(slots)[None, None, :, None] == w - 1
    row_k = jnp.where(last, k_prev[:, :, None].astype(state["row_k"].dtype), state["row_k"])
    row_v = jnp.where(last, v_prev[:, :, None].astype(state["row_v"].dtype), state["row_v"])
    weights = row_fold_weights(w, slots, log_decay_col)  # [heads, w, S]
    weighted_k = weights[None, :, :, :, None] * row_k[:, :, None].astype(jnp.float32)  # [B, H, w, S, d]
    smoothed = common.mm("bhcsd,bhse->bhcde", weighted_k, row_v, dtype)
    g_row = jnp.exp(log_decay_row)[None, :, None, None, None]
    new_columns = g_row * (columns.astype(jnp.float32) + smoothed)
    return {**state, "columns": new_columns.astype(columns.dtype)}


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
