"""The chunked algorithm's blocking and the arithmetic of one chunk, in plain jnp.

Shared by the XLA `chunked` algorithm (chunked.py) and the Pallas chunk kernels (kernels/chunk*.py):
the Triton bodies walk the chunks of one (batch, head) in a loop with the state as the loop carry,
the Mosaic TPU bodies walk them as the last, "arbitrary" grid axis with the state in VMEM scratch,
`chunked` scans over them. Each calls the step functions below on one chunk's values, so the
arithmetic is written once (and differentiated once: `step_with_tangent`).

Chunk layout (docs/lasad.md §6), `ChunkLayout`: tokens packed into chunks of `chunk_tokens` slots.
  - `1d`, `none`: T consecutive tokens per chunk (zero tokens pad the end of the sequence).
  - `2d_row`: R whole rows per chunk (R*w tokens), zero slots pad each chunk to T.
  - `2d`: R whole rows per chunk, each row padded to wp >= w slots (T = R*wp), so that column c
    of every row sits at slot c of its row: the column states are [wp, d, dv].
The kernels need T and wp powers of two (Triton shapes); XLA does not, so `chunked` asks for a
dense layout (`dense=True`: T = R*w, wp = w, no padding inside a chunk). Padding keys and values
are zero, so padded slots add nothing; their outputs are dropped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


GENERIC_VARIANTS = ("1d", "2d_row", "none")  # the variants of the generic (one-state) kernel


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How one sequence of N = h*w cells maps onto chunks of `chunk_tokens` slots."""

    grid: tuple[int, int]
    variant: str
    rows_per_chunk: int  # R for the 2d variants, 0 for 1d/none
    real_tokens: int  # cells per chunk for 1d/none/2d_row (T or R*w); 0 for 2d (rows are padded)
    row_slots: int  # slots per row (wp) for 2d; the grid width for the others' positions
    chunk_tokens: int  # slots per chunk (a power of two unless the layout is dense)
    num_chunks: int

    @property
    def padded_length(self) -> int:
        return self.num_chunks * self.chunk_tokens

    @staticmethod
    def make(grid, variant: str, block_tokens: int, block_tokens_2d: int = 128, dense: bool = False) -> ChunkLayout:
        """The layout of `grid` in chunks of about `block_tokens` slots (`block_tokens_2d` for `2d`).
        dense=False: power-of-two chunks and row slots (what the kernels tile); dense=True: chunks of
        exactly R whole rows (`2d`, `2d_row`) or T tokens (`1d`, `none`), nothing padded inside."""
        if block_tokens < 1 or block_tokens_2d < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens} and {block_tokens_2d} (2d)")
        h, w = grid
        if variant == "2d":
            slots = w if dense else next_power_of_two(max(16, w))
            rows = min(h if dense else next_power_of_two(h), max(1, block_tokens_2d // slots))
            return ChunkLayout(grid, variant, rows, 0, slots, rows * slots, -(-h // rows))
        if variant == "2d_row":
            rows = min(h, max(1, block_tokens // w))
            real = rows * w
            return ChunkLayout(grid, variant, rows, real, w, real if dense else next_power_of_two(max(16, real)),
                               -(-h // rows))
        n = h * w
        tokens = min(block_tokens, n if dense else next_power_of_two(max(16, n)))
        return ChunkLayout(grid, variant, 0, tokens, w, tokens, -(-n // tokens))

    def pack(self, x):
        """[B, N, H, e] -> [B, num_chunks * chunk_tokens, H, e] with zero slots."""
        batch, n, heads, e = x.shape
        h, w = self.grid
        if self.variant == "2d":
            x = x.reshape(batch, h, w, heads, e)
            pad = ((0, 0), (0, self.num_chunks * self.rows_per_chunk - h), (0, self.row_slots - w), (0, 0), (0, 0))
            return jnp.pad(x, pad).reshape(batch, self.padded_length, heads, e)
        x = jnp.pad(x, ((0, 0), (0, self.num_chunks * self.real_tokens - n), (0, 0), (0, 0)))
        if self.real_tokens == self.chunk_tokens:
            return x
        x = x.reshape(batch, self.num_chunks, self.real_tokens, heads, e)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, self.chunk_tokens - self.real_tokens), (0, 0), (0, 0)))
        return x.reshape(batch, self.padded_length, heads, e)

    def unpack(self, y):
        """Inverse of pack: [B, num_chunks * chunk_tokens, H, e] -> [B, N, H, e]."""
        batch, _, heads, e = y.shape
        h, w = self.grid
        if self.variant == "2d":
            y = y.reshape(batch, self.num_chunks * self.rows_per_chunk, self.row_slots, heads, e)
            return y[:, :h, :w].reshape(batch, h * w, heads, e)
        if self.real_tokens != self.chunk_tokens:
            y = y.reshape(batch, self.num_chunks, self.chunk_tokens, heads, e)[:, :, : self.real_tokens]
            y = y.reshape(batch, self.num_chunks * self.real_tokens, heads, e)
        return y[:, : h * w]


# ----------------------------------------------------------------------------- chunk math


def dot(a, b, contract=(1, 0)):
    """a @ b (contract=(1, 0)), a @ b.T (1, 1) or a.T @ b (0, 0) with float32 accumulation.

    float32 inputs get full precision (IEEE on Triton, not tf32). Interpreted on CPU, bf16
    operands are upcast first: XLA:CPU has no bf16 x bf16 -> f32 dot for every shape, and bf16
    products are exact in float32, so the result is the same.
    """
    if a.dtype != b.dtype:
        raise TypeError(f"dot operands must share a dtype, got {a.dtype} and {b.dtype}")
    if a.dtype.itemsize < 4 and jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    precision = jax.lax.Precision.HIGHEST if a.dtype.itemsize >= 4 else None
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32,
    )


def _slot_positions(layout: ChunkLayout, shape, axis: int, start: int = 0):
    """(slot index, row in chunk, column) of each slot along `axis` of an iota of `shape`."""
    slot = jax.lax.broadcasted_iota(jnp.int32, shape, axis) + start
    width = jnp.int32(layout.row_slots)  # slots are >= 0: truncating division is floor division
    return slot, jax.lax.div(slot, width), jax.lax.rem(slot, width)


def intra_chunk_decay(layout: ChunkLayout, log_row, log_col, query_start: int = 0, num_queries: int | None = None,
                      key_start: int = 0, num_keys: int | None = None):
    """[queries, keys] float32: D(a, m) for query slot a (from query_start) and key slot m (from
    key_start) with m < a, else 0; by default every slot of the chunk.

    Exponents are <= 0 wherever the mask is on; the inner where keeps masked slots finite (and
    their derivatives zero).
    """
    t = layout.chunk_tokens
    shape = (t if num_queries is None else num_queries, t if num_keys is None else num_keys)
    q_slot, q_row, q_col = _slot_positions(layout, shape, 0, query_start)
    k_slot, k_row, k_col = _slot_positions(layout, shape, 1, key_start)
    causal = k_slot < q_slot
    variant = layout.variant
    if variant == "none":
        log_decay = jnp.zeros(shape, jnp.float32)
    elif variant == "1d":
        log_decay = log_col * (q_slot - k_slot).astype(jnp.float32)
    elif variant == "2d_row":
        same_row = q_row == k_row
        log_decay = jnp.where(
            same_row, log_col * (q_col - k_col).astype(jnp.float32), log_row * (q_row - k_row).astype(jnp.float32)
        )
    else:
        log_decay = log_row * (q_row - k_row).astype(jnp.float32) + log_col * jnp.abs(q_col - k_col).astype(jnp.float32)
    return jnp.where(causal, jnp.exp(jnp.where(causal, log_decay, 0.0)), 0.0)


def generic_steps(layout: ChunkLayout, log_row, log_col, start: int = 0, count: int | None = None):
    """(log step, steps [count, 1], length): a query `steps` into the chunk reads the state with
    weight exp(log_step * steps); the state moves on by exp(log_step * length) per chunk. For the
    slots start ... start + count (default: the whole chunk)."""
    slot, row, _ = _slot_positions(layout, (layout.chunk_tokens if count is None else count, 1), 0, start)
    if layout.variant == "none":
        return jnp.zeros_like(log_col), slot, layout.real_tokens
    if layout.variant == "1d":
        log_step, steps, length = log_col, slot, layout.real_tokens
    else:  # 2d_row: decay by whole rows
        log_step, steps, length = log_row, row, layout.rows_per_chunk
    return log_step, jnp.minimum(steps, length).astype(jnp.float32), length  # padded slots: exponents <= 0


def generic_output(layout: ChunkLayout, chunk, state, log_row, log_col):
    """[T, dv] float32: the outputs of one chunk of `1d`, `none`, `2d_row`, given the state at its start."""
    q, k, v = chunk
    dtype = q.dtype
    scores = dot(q, k, (1, 1)) * intra_chunk_decay(layout, log_row, log_col)
    out = dot(scores.astype(dtype), v)
    log_step, steps, _ = generic_steps(layout, log_row, log_col)
    query = q if layout.variant == "none" else (q * jnp.exp(log_step * steps)).astype(dtype)
    return out + dot(query, state.astype(dtype))


def generic_next_state(layout: ChunkLayout, k, v, state, log_row, log_col):
    """The state after one chunk: decayed by the chunk's length, plus its keys' k v^T."""
    if layout.variant == "none":
        return state + dot(k, v, (0, 0))
    log_step, steps, length = generic_steps(layout, log_row, log_col)
    key_weight = jnp.exp(log_step * (length - steps))
    return jnp.exp(log_step * length) * state + dot((k * key_weight).astype(k.dtype), v, (0, 0))


def generic_step(layout: ChunkLayout, chunk, state, log_row, log_col):
    """One chunk of the generic kernel (`1d`, `none`, `2d_row`).

    chunk: (q, k [T, d], v [T, dv]); state: [d, dv] float32, the recurrence state at the chunk
    start (the vertical state for `2d_row`). Returns (out [T, dv] float32, next state).
    """
    _, k, v = chunk
    out = generic_output(layout, chunk, state, log_row, log_col)
    return out, generic_next_state(layout, k, v, state, log_row, log_col)


def generic_weights(layout: ChunkLayout, log_row, log_col, start: int = 0, count: int | None = None):
    """(query weights [count, 1], key weights [count, 1], chunk decay): the factor with which a query
    reads the chunk's starting state, a key enters the next chunk's state, and the state moves on;
    for the slots start ... start + count (default: the whole chunk)."""
    if layout.variant == "none":
        ones = jnp.ones((layout.chunk_tokens if count is None else count, 1), jnp.float32)
        return ones, ones, jnp.ones_like(log_col)
    log_step, steps, length = generic_steps(layout, log_row, log_col, start, count)
    return jnp.exp(log_step * steps), jnp.exp(log_step * (length - steps)), jnp.exp(log_step * length)


def generic_previous_adjoint(layout: ChunkLayout, q, d_out, adjoint, log_row, log_col):
    """The reverse recurrence of the chunk backward: dL/d(state at this chunk's start), given
    `adjoint` = dL/d(state at the next chunk's start) [d, dv] float32 and the chunk's q, d_out:
        chunk decay * adjoint + sum_a (query weight_a q_a) d_out_a^T."""
    query_weight, _, chunk_decay = generic_weights(layout, log_row, log_col)
    return chunk_decay * adjoint + dot((q * query_weight).astype(q.dtype), d_out, (0, 0))


def pair_vector(first, second, shape):
    """float32 array of `shape` holding first, second in its first two lanes (last axis), zeros
    elsewhere: two scalars as one small block to store."""
    lane = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    return jnp.where(lane == 0, first, jnp.where(lane == 1, second, 0.0)).astype(jnp.float32)


def intra_exponent_factors(layout: ChunkLayout, query_start: int, num_queries: int, key_start: int, num_keys: int):
    """[queries, keys] float32 (row factor, column factor): the within-chunk exponent of D(a, m) is
    row factor * log g_row + column factor * log g_col (zero off the causal mask)."""
    shape = (num_queries, num_keys)
    q_slot, q_row, q_col = _slot_positions(layout, shape, 0, query_start)
    k_slot, k_row, k_col = _slot_positions(layout, shape, 1, key_start)
    causal = k_slot < q_slot
    zero = jnp.zeros(shape, jnp.float32)
    if layout.variant == "1d":
        return zero, jnp.where(causal, (q_slot - k_slot).astype(jnp.float32), 0.0)
    same_row = q_row == k_row
    return (jnp.where(causal & ~same_row, (q_row - k_row).astype(jnp.float32), 0.0),
            jnp.where(causal & same_row, (q_col - k_col).astype(jnp.float32), 0.0))


def generic_gradients(layout: ChunkLayout, chunk, state, adjoint, log_row, log_col):
    """The gradients of one chunk of `1d`, `none`, `2d_row` (chunks are independent given the states).

    chunk: (q, k, v, d_out), each a list of the chunk's S sub-blocks of slots ([T / S, d] or
    [T / S, dv]; one block is the whole chunk): the within-chunk products are formed per pair of
    sub-blocks, so no T x T tile is live at once (T x T float32 tiles spill registers on a GPU
    above T = 64). state: the state at the chunk start, adjoint: dL/d(state at the next chunk's
    start), both [d, dv] (float32, or as stored: the inputs' dtype). Returns (dq, dk, dv) as lists
    of float32 sub-blocks and this chunk's share of d log g_row, d log g_col.

    Every pair term carries its exponent's local factor (slot/row/column distance inside the
    chunk, or steps to the chunk's edges), so nothing large cancels: for a chunk-crossing pair the
    exponent splits into the query's steps from its chunk start, whole chunks of state decay, and
    the key's steps to its chunk end.
    """
    q_blocks, k_blocks, v_blocks, d_out_blocks = chunk
    dtype = q_blocks[0].dtype
    size = q_blocks[0].shape[0]
    state_in, adjoint_in = state.astype(dtype), adjoint.astype(dtype)
    decays = layout.variant != "none"
    # the decay a chunk-crossing pair uses: rows for 2d_row (chunks are whole rows), tokens for 1d
    add_crossing = lambda d_row, d_col, x: (d_row + x, d_col) if layout.variant == "2d_row" else (d_row, d_col + x)
    d_row = d_col = jnp.zeros((), jnp.float32)
    dq_blocks, dk_blocks, dv_blocks = [], [], []
    for i, (q, k, v, d_out) in enumerate(zip(q_blocks, k_blocks, v_blocks, d_out_blocks)):
        query_weight, key_weight, _ = generic_weights(layout, log_row, log_col, i * size, size)
        dq_blocks.append(query_weight * dot(d_out, state_in, (1, 1)))  # the chunk-crossing parts first
        dk_blocks.append(key_weight * dot(v, adjoint_in, (1, 1)))
        dv_blocks.append(key_weight * dot(k, adjoint_in))
        if decays:
            _, steps, length = generic_steps(layout, log_row, log_col, i * size, size)
            crossing = (jnp.sum(steps * jnp.sum(q.astype(jnp.float32) * dq_blocks[i], axis=1, keepdims=True))
                        + jnp.sum((length - steps) * jnp.sum(k.astype(jnp.float32) * dk_blocks[i], axis=1,
                                                             keepdims=True)))
            d_row, d_col = add_crossing(d_row, d_col, crossing)
    for i, (q, d_out) in enumerate(zip(q_blocks, d_out_blocks)):  # query block i, key block j <= i
        for j, (k, v) in enumerate(zip(k_blocks[: i + 1], v_blocks[: i + 1])):
            decay = intra_chunk_decay(layout, log_row, log_col, i * size, size, j * size, size)
            scores = dot(q, k, (1, 1)) * decay  # P(a, m) = D(a, m) q_a . k_m
            d_out_v = dot(d_out, v, (1, 1))  # d_out_a . v_m
            d_scores = (d_out_v * decay).astype(dtype)
            dq_blocks[i] = dq_blocks[i] + dot(d_scores, k)
            dk_blocks[j] = dk_blocks[j] + dot(d_scores, q, (0, 0))
            dv_blocks[j] = dv_blocks[j] + dot(scores.astype(dtype), d_out, (0, 0))
            if decays:
                pair = scores * d_out_v  # each pair's share of the loss
                row_factor, col_factor = intra_exponent_factors(layout, i * size, size, j * size, size)
                d_row, d_col = d_row + jnp.sum(row_factor * pair), d_col + jnp.sum(col_factor * pair)
    if decays:
        log_step, _, length = generic_steps(layout, log_row, log_col)
        overlap = jnp.sum(adjoint.astype(jnp.float32) * state.astype(jnp.float32))
        whole_chunks = length * jnp.exp(log_step * length) * overlap
        d_row, d_col = add_crossing(d_row, d_col, whole_chunks)
    return dq_blocks, dk_blocks, dv_blocks, d_row, d_col


def column_smoothing(width: int, log_col):
    """[wp, wp] float32: g_col^|c - c'|, the two-sided row fold of `2d` as a matrix."""
    c = jax.lax.broadcasted_iota(jnp.int32, (width, width), 0)
    c_other = jax.lax.broadcasted_iota(jnp.int32, (width, width), 1)
    return jnp.exp(log_col * jnp.abs(c - c_other).astype(jnp.float32))


def rows_step(layout: ChunkLayout, chunk, column_states, log_row, log_col):
    """R rows of the `2d` kernel.

    chunk: (q_rows, k, v, k_rows, v_rows): per-row lists of [wp, dk] / [wp, dv] tiles and the whole
    chunk's k [T, dk], v [T, dv]. column_states: [wp, dk * dv] float32, column c's dk x dv state
    (rows above the chunk, decayed to its first row) flattened in row c. For the query in local row
    i, column c (a partial sum over this key-dim tile):
        out = sum_{m < a in the chunk} D(a, m) (q . k_m) v_m  +  g_row^i q^T C[c]
    and after the chunk (the row fold: a two-sided smoothing along the row, as one matmul)
        C[c] <- g_row^R C[c] + sum_c' g_col^|c - c'| sum_i g_row^(R - i) k_(i,c') v_(i,c')^T
    Returns (list of R row outputs [wp, dv] float32, next column states).
    """
    q_rows, k, v, k_rows, v_rows = chunk
    dtype = k.dtype
    width, rows = layout.row_slots, layout.rows_per_chunk
    key_dim, value_dim = k.shape[1], v.shape[1]
    states = column_states.reshape(width, key_dim, value_dim)
    outs = []
    for i, q in enumerate(q_rows):
        scores = dot(q, k, (1, 1)) * intra_chunk_decay(layout, log_row, log_col, i * width, width)
        from_states = jnp.sum(q.astype(jnp.float32)[:, :, None] * states, axis=1)
        outs.append(dot(scores.astype(dtype), v) + jnp.exp(log_row * i) * from_states)
    row_kv = sum(
        jnp.exp(log_row * (rows - i)) * (k_row.astype(jnp.float32)[:, :, None] * v_row.astype(jnp.float32)[:, None, :])
        for i, (k_row, v_row) in enumerate(zip(k_rows, v_rows))
    )
    flat_kv = row_kv.reshape(width, key_dim * value_dim).astype(dtype)
    smoothed = dot(column_smoothing(width, log_col).astype(dtype), flat_kv)
    return outs, jnp.exp(log_row * rows) * column_states + smoothed


def step_of(layout: ChunkLayout):
    return rows_step if layout.variant == "2d" else generic_step


TANGENTS = (None, "row", "col")


def step_with_tangent(step, tangent, layout, chunk, carry, log_row, log_col):
    """step(...) or, for tangent 'row'/'col', its forward-mode derivative along that log decay.

    carry is the state, or (state, d state / d log decay) with a tangent; returns (out, carry)
    where out is the output, or its derivative with a tangent. The kernels call this on every
    chunk, so the decay gradients come from the same arithmetic as the forward pass.
    """
    if tangent is None:
        return step(layout, chunk, carry, log_row, log_col)
    if tangent not in TANGENTS:
        raise ValueError(f"tangent must be one of {TANGENTS}, got {tangent!r}")
    state, state_dot = carry
    one, zero = jnp.ones_like(log_row), jnp.zeros_like(log_row)
    direction = (one, zero) if tangent == "row" else (zero, one)
    (_, state), (out_dot, state_dot) = jax.jvp(
        lambda row, col, s: step(layout, chunk, s, row, col), (log_row, log_col, state), (*direction, state_dot)
    )
    return out_dot, (state, state_dot)
