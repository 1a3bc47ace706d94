"""The `chunked` algorithm: blocks of tokens, a masked matmul inside each block, a state between blocks.

Blocks are whole rows for `2d` and `2d_row` (R rows, T = R*w tokens) so that a block's local cell
coordinates give true decay distances; for `1d` and `none` they are T consecutive tokens. With a
block starting at row r0 (or token t0), a query at local row i (local token i) reads

    2d       g_row^i * column_state[c]         column_state: [w, d, dv]
    2d_row   g_row^i * vertical_state          [d, dv]
    1d       g^i * state                       [d, dv]
    none     state

and after the block the state moves on by R rows (T tokens): it decays by g_row^R (g^T) and takes
the block's keys weighted by g_row^(R - i) (g^(T - i)); for `2d` each row is first smoothed
two-sidedly along the row. States are float32; matmul inputs keep the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasadgen_jax.ops.lasad import common

DEFAULT_BLOCK_TOKENS = 128


def block_shape(grid, variant: str, block_tokens: int) -> tuple[int, int, int]:
    """(rows per block R, tokens per block T, number of blocks). R = 0 for the 1d/none blocks."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    h, w = grid
    if variant in ("2d", "2d_row"):
        rows = min(h, max(1, block_tokens // w))
        return rows, rows * w, -(-h // rows)
    tokens = min(block_tokens, h * w)
    return 0, tokens, -(-(h * w) // tokens)


def chunked_cells(q, k, v, log_decay_row, log_decay_col, *, grid, variant, block_tokens=DEFAULT_BLOCK_TOKENS):
    """Float32 [B, N, H, dv] for the cell part of LASAD (no prefix)."""
    _, w = grid
    batch, n, heads, d = q.shape
    dv = v.shape[-1]
    rows, tokens, num_blocks = block_shape(grid, variant, block_tokens)
    dtype = q.dtype

    def to_blocks(x):  # [B, N, H, e] -> [blocks, B, H, T, e], zero tokens padded at the end
        x = jnp.pad(x, ((0, 0), (0, num_blocks * tokens - n), (0, 0), (0, 0)))
        return x.reshape(batch, num_blocks, tokens, heads, x.shape[-1]).transpose(1, 0, 3, 2, 4)

    local = jnp.arange(tokens)
    causal = local[None, :] < local[:, None]
    # steps: each query's distance from the block start in decay steps (tokens, or rows for 2d).
    if variant in ("2d", "2d_row"):
        intra_log, _, _ = common.pair_log_decay(
            variant, w, local[:, None], local[None, :], log_decay_row[:, None, None], log_decay_col[:, None, None]
        )
        steps, block_length, log_step = (local // w)[None, :], rows, log_decay_row
    else:  # 1d: g^(a - m) with g = exp(log_decay_col); none: no decay at all
        log_step = log_decay_col if variant == "1d" else jnp.zeros_like(log_decay_col)
        intra_log = log_step[:, None, None] * (local[:, None] - local[None, :])
        steps, block_length = local[None, :], tokens
    intra_decay = common.masked_decay(intra_log, causal)[None]  # [1, H, T, T]
    query_weight = jnp.exp(log_step[:, None] * steps)[None, :, :, None]  # [1, H, T, 1]
    key_weight = jnp.exp(log_step[:, None] * (block_length - steps))[None, :, :, None]
    state_decay = jnp.exp(log_step * block_length)[None, :, None, None]  # [1, H, 1, 1]

    acc = common.accumulation_dtype(dtype)
    if variant == "2d":
        state = jnp.zeros((batch, heads, w, d, dv), acc)
    else:
        state = jnp.zeros((batch, heads, d, dv), acc)

    def block_step(state, block):
        q_block, k_block, v_block = block  # [B, H, T, d|dv]
        scores = common.mm("bhtd,bhsd->bhts", q_block, k_block, dtype) * intra_decay
        out = common.mm("bhts,bhse->bhte", scores, v_block, dtype)
        weighted_q = q_block * query_weight
        weighted_k = k_block * key_weight
        if variant == "2d":
            by_column = lambda x: x.reshape(batch, heads, rows, w, x.shape[-1])
            out += common.mm("bhrcd,bhcde->bhrce", by_column(weighted_q), state, dtype).reshape(out.shape)
            block_kv = common.mm("bhrcd,bhrce->bhcde", by_column(weighted_k), by_column(v_block), dtype)
            smoothed = common.two_sided_smooth(block_kv, log_decay_col, axis=2, head_axis=1)
            state = state_decay[..., None] * state + smoothed
        else:
            out += common.mm("bhtd,bhde->bhte", weighted_q, state, dtype)
            state = state_decay * state + common.mm("bhtd,bhte->bhde", weighted_k, v_block, dtype)
        return state, out

    _, out = jax.lax.scan(block_step, state, (to_blocks(q), to_blocks(k), to_blocks(v)))
    out = out.transpose(1, 0, 3, 2, 4).reshape(batch, num_blocks * tokens, heads, dv)
    return out[:, :n]
