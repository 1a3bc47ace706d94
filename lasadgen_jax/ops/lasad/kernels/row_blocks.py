"""`2d` over blocks of rows: `impl="pallas_row_blocks"` (GPU; docs/lasad.md §9).

    o_a = sum_{m<a} g_row^(r_a - r_m) g_col^|c_a - c_m| (q_a . k_m) v_m      (no prefix)

The grid's rows are cut into n blocks of R rows (the last padded with zero tokens). A pair whose
key lies in the query's block goes through the parallel-form kernel (kernels/parallel_form.py),
run on the blocks as a batch of R x w grids: the decay depends only on position differences. A
pair whose key lies in an earlier block goes through two column sweeps, a Triton kernel each:

    from the left:  o_a += sum over keys m in earlier blocks with c_m <= c_a
    from the right: o_a += sum over keys m in earlier blocks with c_m >  c_a

A sweep program owns one (batch, head, value tile) and walks the w columns. At column c it folds
the keys of that column into one d x dv_block float32 state per query block j >= 1,

    V_c[j] = sum_{i<j} g_row^((j-1-i) R) W_c[i],   W_c[i] = sum_{rows r of block i} g_row^(R - r) k v^T,
    from the left:  S[j] <- g_col S[j] + V_c[j], then read;
    from the right: read, then S[j] <- g_col (S[j] + V_c[j]),

and reads o = (g_row^r q) S[j] for the queries of column c in block j (r the row in the block).
The state is per query block, not per column, so the n - 1 states stay in registers for the whole
walk: nothing of size N x d x dv goes to HBM. Work per token about 4 d dv (plus the parallel form's
R w (d + dv) / 2 inside its block), so the cost grows as R w, not N.

Backward: the across-block part is linear in each of q, k, v, so each gradient is the same sweep
on other operands: dq = sweeps(do, v, k); dk and dv = the mirrored sweeps (Side: receivers in the
earlier blocks, row weights flipped, the column walk and its inclusion swapped so that each splits
the pairs as the forward's two do) of (v, do, q) and (k, q, do). The log-decay gradients come from
the per-side sums these give: with X(a, m) = D (q_a.k_m)(v_m.do_a), sum_m X = q_a.dq_a and
sum_a X = v_m.dv_m, so

    d log g_row = sum_a r_a q_a.dq_a - sum_m r_m v_m.dv_m,
    d log g_col = sum_a c_a q_a.(dq_left - dq_right)_a - sum_m c_m v_m.(dv_left - dv_right)_m

(rows and columns centred on the grid, which changes neither sum and keeps them small). Only the
inputs are kept between forward and backward. The within-block part has the parallel-form
kernel's own backward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lasadgen_jax.ops.lasad.chunk_math import dot
from lasadgen_jax.ops.lasad.kernels import parallel_form
from lasadgen_jax.ops.lasad.kernels.backend import pad_last, padded_dim, stack_decays
from lasadgen_jax.ops.lasad.kernels.parallel_form import ParallelBlocks


def _power_of_two(value) -> bool:
    return isinstance(value, int) and value >= 1 and not value & (value - 1)


@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """Tiles of `impl="pallas_row_blocks"`.

    rows: rows per block R, a power of two >= 16 (the sweeps' matmuls take R rows of one column).
      Larger R moves work from the sweeps into the within-block parallel form (R w (d + dv) / 2
      per token).
    dv_block: value columns per sweep program (a power of two >= 16, or 0: sweep_dv_block picks); a
      program holds n - 1 states of d x dv_block float32 in registers.
    num_warps, num_stages: the sweeps' Triton launch parameters.
    parallel: tiles of the within-block parallel-form kernel.
    """

    rows: int = 16
    dv_block: int = 0
    num_warps: int = 4
    num_stages: int = 2
    parallel: ParallelBlocks = ParallelBlocks()

    def __post_init__(self):
        for name in ("rows", "dv_block", "num_warps"):
            value = getattr(self, name)
            if not (_power_of_two(value) or (name == "dv_block" and value == 0)):
                raise ValueError(f"RowBlocks.{name} must be a power of two, got {value!r}")
        for name in ("rows", "dv_block"):
            if 0 < getattr(self, name) < 16:
                raise ValueError(f"RowBlocks.{name} must be >= 16 (matrix-unit tiles), got {getattr(self, name)}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"RowBlocks.num_stages must be an int >= 1, got {self.num_stages!r}")
        if not isinstance(self.parallel, ParallelBlocks):
            raise ValueError(f"RowBlocks.parallel must be a ParallelBlocks, got {self.parallel!r}")


# ----------------------------------------------------------------------------- the column sweep

MIN_PROGRAMS = 128   # about one sweep program per SM of an H100 or H200 (132)


def sweep_dv_block(tiles: RowBlocks, batch: int, heads: int, dv: int) -> int:
    """The sweeps' value tile: tiles.dv_block, or for 0 the widest of 64, 32, 16 that still launches
    MIN_PROGRAMS programs (batch x heads x value tiles), else 16. 64 was the fastest of 16/32/64 at
    N = 4096 (batch 8: 128 programs) and 16 at N = 16384 (batch 2) (RESULTS.md, "`2d` over blocks of rows")."""
    if tiles.dv_block:
        return min(tiles.dv_block, dv)
    for tile in (64, 32):
        if tile <= dv and batch * heads * -(-dv // tile) >= MIN_PROGRAMS:
            return tile
    return 16


@dataclasses.dataclass(frozen=True)
class Side:
    """Which across-block pairs a sweep sums, for each query: keys in earlier blocks (keys_before) or
    in later ones, walking the columns ascending or descending, the query's own column included
    (inclusive: fold the column, then read) or not (read, then fold)."""

    keys_before: bool
    ascending: bool
    inclusive: bool


# The forward's two sweeps: keys at or left of the query's column, and right of it.
FROM_LEFT, FROM_RIGHT = Side(True, True, True), Side(True, False, False)
# The same pairs seen from the key (dk, dv): queries in later blocks at or right of the key's
# column (the pairs of FROM_LEFT), and left of it (those of FROM_RIGHT).
TO_RIGHT, TO_LEFT = Side(False, False, True), Side(False, True, False)


def _sweep_kernel(decay_ref, q_ref, k_ref, v_ref, out_ref, *, rows: int, blocks: int, width: int, side: Side):
    """One (batch, head, value tile): walk the columns keeping one state per receiving block, and
    write every block's outputs of each column (the first block in the walk receives nothing: zeros).
    The refs hold a whole sequence [h*w, dim]; a block's rows of column c are a slice of stride w."""
    log_row, log_col = decay_ref[0], decay_ref[1]
    col_decay, block_decay = jnp.exp(log_col), jnp.exp(log_row * rows)
    local_row = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0).astype(jnp.float32)
    if side.keys_before:   # a key's decay to the next block's first row; a query's from its block's first row
        key_weight, query_weight = jnp.exp(log_row * (rows - local_row)), jnp.exp(log_row * local_row)
        order = list(range(blocks))
    else:                  # mirrored: keys in later blocks, distances measured upward
        key_weight, query_weight = jnp.exp(log_row * (local_row + 1)), jnp.exp(log_row * (rows - 1 - local_row))
        order = list(range(blocks - 1, -1, -1))
    d, dv_block = q_ref.shape[-1], v_ref.shape[-1]
    block_column = lambda i, c: pl.ds(i * rows * width + c, rows, stride=width)

    def column(step, states):
        c = step if side.ascending else width - 1 - step
        folded, later = None, []   # later[j]: the folded keys of the blocks before order[j + 1]
        for i in order[:-1]:
            k, v = k_ref[block_column(i, c), :], v_ref[block_column(i, c), :]
            weights = dot((k * key_weight).astype(k.dtype), v, (0, 0))
            folded = weights if folded is None else folded * block_decay + weights
            later.append(folded)
        out_ref[block_column(order[0], c), :] = jnp.zeros((rows, dv_block), out_ref.dtype)
        updated = []
        for state, fold, j in zip(states, later, order[1:]):
            if side.inclusive:
                state = state * col_decay + fold
                read = state
            else:
                read = state
                state = (state + fold) * col_decay
            q = q_ref[block_column(j, c), :]
            out = dot((q * query_weight).astype(q.dtype), read.astype(q.dtype))
            out_ref[block_column(j, c), :] = out.astype(out_ref.dtype)
            updated.append(state)
        return tuple(updated)

    jax.lax.fori_loop(0, width, column, tuple(jnp.zeros((d, dv_block), jnp.float32) for _ in range(blocks - 1)))


def sweep(query, key, value, decays, *, grid, rows: int, side: Side, tiles: RowBlocks, interpret: bool):
    """float32 [B, h*w, H, e]: for each token, the across-block sum of `side` (module docstring)
    over query [B, h*w, H, d], key [B, h*w, H, d], value [B, h*w, H, e], h a multiple of rows;
    decays [H, 2] float32 (log g_row, log g_col)."""
    h, w = grid
    batch, n, heads, _ = query.shape
    e = value.shape[-1]
    d_pad, e_pad = padded_dim("gpu", query.shape[-1]), padded_dim("gpu", e)
    dv_block = sweep_dv_block(tiles, batch, heads, e_pad)
    whole = lambda size: pl.BlockSpec((None, n, None, size), lambda b, hd, t: (b, 0, hd, 0))
    value_tile = pl.BlockSpec((None, n, None, dv_block), lambda b, hd, t: (b, 0, hd, t))
    name = f"lasad_row_blocks_sweep_{'down' if side.keys_before else 'up'}_{'incl' if side.inclusive else 'excl'}"
    out = pl.pallas_call(
        functools.partial(_sweep_kernel, rows=rows, blocks=h // rows, width=w, side=side),
        out_shape=jax.ShapeDtypeStruct((batch, n, heads, e_pad), jnp.float32),
        grid=(batch, heads, e_pad // dv_block),
        in_specs=[pl.BlockSpec((None, 2), lambda b, hd, t: (hd, 0)), whole(d_pad), whole(d_pad), value_tile],
        out_specs=value_tile,
        compiler_params=pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=name,
    )(decays, pad_last(query, d_pad), pad_last(key, d_pad), pad_last(value, e_pad))
    return out[..., :e]


def _sweeps(query, key, value, decays, sides, **kwargs):
    return tuple(sweep(query, key, value, decays, side=side, **kwargs) for side in sides)


def _centred(size: int):
    return jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2


@functools.lru_cache(maxsize=None)
def _across_blocks(tiles: RowBlocks, interpret: bool):
    """across(q, k, v, log_row, log_col, grid) -> float32 [B, N, H, dv]: the pairs whose key lies in
    an earlier block, with the sweep backward of the module docstring. grid: (h, w), h a multiple of
    tiles.rows."""
    options = dict(rows=tiles.rows, tiles=tiles, interpret=interpret)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def across(q, k, v, log_row, log_col, grid):
        left, right = _sweeps(q, k, v, stack_decays(log_row, log_col), (FROM_LEFT, FROM_RIGHT), grid=grid, **options)
        return left + right

    def across_forward(q, k, v, log_row, log_col, grid):
        return across(q, k, v, log_row, log_col, grid), (q, k, v, log_row, log_col)

    def across_backward(grid, residuals, d_out):
        q, k, v, log_row, log_col = residuals
        h, w = grid
        decays = stack_decays(log_row, log_col)
        d_out = d_out.astype(q.dtype)
        dq_left, dq_right = _sweeps(d_out, v, k, decays, (FROM_LEFT, FROM_RIGHT), grid=grid, **options)
        dk_left, dk_right = _sweeps(v, d_out, q, decays, (TO_RIGHT, TO_LEFT), grid=grid, **options)
        dv_left, dv_right = _sweeps(k, q, d_out, decays, (TO_RIGHT, TO_LEFT), grid=grid, **options)
        # per token, the sums of X over its partners: from the query's side and from the key's side,
        # split into the pairs of FROM_LEFT (key column <= query column) and FROM_RIGHT
        per_token = lambda x, grad: jnp.einsum("bnhe,bnhe->bnh", x.astype(jnp.float32), grad)
        query_left, query_right = per_token(q, dq_left), per_token(q, dq_right)
        key_left, key_right = per_token(v, dv_left), per_token(v, dv_right)
        row = jnp.repeat(_centred(h), w)[None, :, None]
        col = jnp.tile(_centred(w), h)[None, :, None]
        d_row = jnp.sum(row * (query_left + query_right - key_left - key_right), axis=(0, 1))
        d_col = jnp.sum(col * (query_left - query_right - key_left + key_right), axis=(0, 1))
        return ((dq_left + dq_right).astype(q.dtype), (dk_left + dk_right).astype(k.dtype),
                (dv_left + dv_right).astype(v.dtype), d_row.astype(log_row.dtype), d_col.astype(log_col.dtype))

    across.defvjp(across_forward, across_backward)
    return across


@functools.lru_cache(maxsize=None)
def row_block_cells(backend: str, interpret: bool, tiles: RowBlocks):
    """cells(q, k, v, log_decay_row, log_decay_col, grid, variant) -> [B, N, H, dv] in q.dtype:
    the within-block pairs by the parallel-form kernel, the across-block pairs by the column
    sweeps; grid and variant static. GPU only (Triton), or interpret mode on CPU."""
    if backend != "gpu":
        raise ValueError(f"impl='pallas_row_blocks' has a GPU (Triton) body only, got backend {backend!r}")
    within = parallel_form.parallel_form_cells(backend, interpret, tiles.parallel)
    across = _across_blocks(tiles, interpret)

    def cells(q, k, v, log_decay_row, log_decay_col, grid, variant):
        if variant != "2d":
            raise ValueError(f"impl='pallas_row_blocks' computes the '2d' variant only, got variant={variant!r}")
        h, w = grid
        rows = tiles.rows
        blocks = -(-h // rows)
        if blocks == 1:
            return within(q, k, v, log_decay_row, log_decay_col, grid, variant)
        batch, n, heads, _ = q.shape
        padded = blocks * rows * w
        pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - n), (0, 0), (0, 0)))
        q_p, k_p, v_p = pad(q), pad(k), pad(v)
        as_blocks = lambda x: x.reshape(batch * blocks, rows * w, heads, x.shape[-1])
        inside = within(as_blocks(q_p), as_blocks(k_p), as_blocks(v_p), log_decay_row, log_decay_col, (rows, w),
                        variant).reshape(batch, padded, heads, v.shape[-1])
        outside = across(q_p, k_p, v_p, log_decay_row, log_decay_col, (blocks * rows, w))
        return (inside.astype(jnp.float32) + outside)[:, :n].astype(q.dtype)

    return cells
