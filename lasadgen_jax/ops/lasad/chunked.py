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

The blocks are a dense `ChunkLayout` (chunk_math.py, `block_layout` below): the blocking of the
Pallas chunk kernels without their power-of-two padding, for the forward and the backward alike.

Gradients (`chunked_with_vjp`): for `1d`, `2d_row`, `none` the chunk backward of the Pallas
kernels (docs/lasad.md §6) in XLA, on the same per-chunk arithmetic (chunk_math.py): every
chunk's starting state by a scan, the states' adjoints by a reverse scan, then every chunk's
gradients at once. `2d` (whose state is w column states) by recomputation (autodiff.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lasadgen_jax.ops.lasad import autodiff, chunk_math, common
from lasadgen_jax.ops.lasad.chunk_math import ChunkLayout

# Tokens per block of the forward and of the chunk backward: the sizes the CPU and H200 timings of
# `chunked` were taken with (benchmarks/RESULTS.md, "LASAD op, pure-JAX algorithms": the forward;
# its "CPU: `chunked` with the chunk backward against recomputation": the backward). No run has
# compared other sizes.
DEFAULT_BLOCK_TOKENS = 128
GRADIENT_BLOCK_TOKENS = 64


def block_layout(grid, variant: str, block_tokens: int) -> ChunkLayout:
    """The blocks of `chunked`: R whole rows of about block_tokens tokens (`2d`, `2d_row`) or
    block_tokens consecutive tokens (`1d`, `none`), nothing padded inside a block."""
    return ChunkLayout.make(grid, variant, block_tokens, block_tokens, dense=True)


def chunked_cells(q, k, v, log_decay_row, log_decay_col, *, grid, variant, block_tokens=DEFAULT_BLOCK_TOKENS):
    """Float32 [B, N, H, dv] for the cell part of LASAD (no prefix)."""
    _, w = grid
    batch, _, heads, d = q.shape
    dv = v.shape[-1]
    layout = block_layout(grid, variant, block_tokens)
    rows, tokens, num_blocks = layout.rows_per_chunk, layout.chunk_tokens, layout.num_chunks
    dtype = q.dtype

    def to_blocks(x):  # [B, N, H, e] -> [blocks, B, H, T, e], zero tokens padded at the end
        return layout.pack(x).reshape(batch, num_blocks, tokens, heads, x.shape[-1]).transpose(1, 0, 3, 2, 4)

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
    return layout.unpack(out.transpose(1, 0, 3, 2, 4).reshape(batch, num_blocks * tokens, heads, dv))


def chunk_gradients(q, k, v, log_decay_row, log_decay_col, d_out, *, grid, variant,
                    block_tokens=GRADIENT_BLOCK_TOKENS):
    """(dq, dk, dv, d log_decay_row, d log_decay_col) in float32 for `1d`, `2d_row`, `none`: the
    states by a scan over chunks, their adjoints by a reverse scan, then every chunk's gradients
    in parallel (vmapped chunk_math.generic_gradients). Keeps one d x dv state and adjoint per
    chunk, batch element and head; d_out is the cotangent of the cell output."""
    if variant not in chunk_math.GENERIC_VARIANTS:
        raise ValueError(f"the chunk backward covers {chunk_math.GENERIC_VARIANTS}, got {variant!r}")
    layout = block_layout(grid, variant, block_tokens)
    batch, _, heads, d = q.shape
    dv = v.shape[-1]
    chunks, tokens = layout.num_chunks, layout.chunk_tokens

    def to_chunks(x):  # [B, N, H, e] -> [C, B, H, T, e]
        x = layout.pack(x).reshape(batch, chunks, tokens, heads, x.shape[-1])
        return x.transpose(1, 0, 3, 2, 4)

    def from_chunks(x):  # [C, B, H, T, e] -> [B, N, H, e]
        return layout.unpack(x.transpose(1, 0, 3, 2, 4).reshape(batch, chunks * tokens, heads, x.shape[-1]))

    def per_batch_and_head(fn, arrays: int):
        """fn over [B, H] leading axes of its first `arrays` arguments; the two log decays by head."""
        by_head = jax.vmap(fn, in_axes=(0,) * arrays + (0, 0))
        return jax.vmap(by_head, in_axes=(0,) * arrays + (None, None))

    q_c, k_c, v_c, d_out_c = map(to_chunks, (q, k, v, d_out.astype(q.dtype)))
    next_state = per_batch_and_head(functools.partial(chunk_math.generic_next_state, layout), 3)
    previous_adjoint = per_batch_and_head(functools.partial(chunk_math.generic_previous_adjoint, layout), 3)
    zero = jnp.zeros((batch, heads, d, dv), jnp.float32)
    _, states = jax.lax.scan(
        lambda state, kv: (next_state(*kv, state, log_decay_row, log_decay_col), state), zero, (k_c, v_c))
    _, adjoints = jax.lax.scan(
        lambda adjoint, qg: (previous_adjoint(*qg, adjoint, log_decay_row, log_decay_col), adjoint), zero,
        (q_c, d_out_c), reverse=True)

    def one_chunk(q1, k1, v1, d_out1, state, adjoint, log_row, log_col):
        (dq,), (dk,), (d_v,), d_row, d_col = chunk_math.generic_gradients(
            layout, ([q1], [k1], [v1], [d_out1]), state, adjoint, log_row, log_col)
        return dq, dk, d_v, d_row, d_col

    every_chunk = jax.vmap(per_batch_and_head(one_chunk, 6), in_axes=(0,) * 6 + (None, None))
    dq, dk, d_v, d_row, d_col = every_chunk(q_c, k_c, v_c, d_out_c, states, adjoints, log_decay_row, log_decay_col)
    return from_chunks(dq), from_chunks(dk), from_chunks(d_v), jnp.sum(d_row, axis=(0, 1)), jnp.sum(d_col, axis=(0, 1))


def chunked_with_vjp(block_tokens: int = DEFAULT_BLOCK_TOKENS):
    """chunked_cells(q, k, v, log_decay_row, log_decay_col, grid, variant) with a custom_vjp that
    stores only the inputs: the chunk backward for `1d`, `2d_row`, `none`, recomputation for `2d`
    (and for float64 inputs, which the float32 chunk arithmetic would round)."""
    forward_fn = functools.partial(chunked_cells, block_tokens=block_tokens)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def cells(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return forward_fn(q, k, v, log_decay_row, log_decay_col, grid=grid, variant=variant)

    def forward(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return cells(q, k, v, log_decay_row, log_decay_col, grid, variant), (q, k, v, log_decay_row, log_decay_col)

    def backward(grid, variant, residuals, d_out):
        if variant == "2d" or residuals[0].dtype.itemsize > 4:  # float64: the chunk math is float32
            return autodiff.recompute_backward(forward_fn, grid, variant, residuals, d_out)
        q, k, v, log_decay_row, log_decay_col = residuals
        dq, dk, d_v, d_row, d_col = chunk_gradients(q, k, v, log_decay_row, log_decay_col, d_out, grid=grid,
                                                    variant=variant)
        return (dq.astype(q.dtype), dk.astype(k.dtype), d_v.astype(v.dtype),
                d_row.astype(log_decay_row.dtype), d_col.astype(log_decay_col.dtype))

    cells.defvjp(forward, backward)
    return cells
