"""The linear-time `2d` kernel's forward as Mosaic GPU (Hopper) kernels (docs/lasad.md §8):
`LinearBlocks(gpu_body="mosaic")`. The reverse sweep stays the Triton body's; the backward's dq
call (a forward on (do, v, k)) runs here too.

The forward of §8 split in two kernels whose outputs are summed in XLA:

- `_within_kernel`: the pairs inside a chunk of R rows, one block per (batch, head, group of
  chunks), a pipeline over its chunks. Per query row i and key row j <= i of the chunk, one 64 x 64
  tile pair: out_i += ((q_i k_j^T) * D_(i-j)) v_j on the matrix units (wgmma), with D_0 the strict
  within-row table g_col^|c - c'| (c' < c) and D_t = g_row^t g_col^|c - c'|.
- `_state_kernel`: the column states, one block per (value tile of `value_tile` columns, head,
  batch) holding all w column states of its tile in shared memory, [value_tile, 64, d] float32
  (128 KiB at d = 64, value tiles of 8), for the whole sequence: no state goes to HBM. Per chunk and
  value column b, the states S_b [64 columns, d] (column c's state's b-th value column) are read by
  every query row, reads_(i, c, b) = q_(i,c) . S_b[c] (a product and a row sum on the CUDA cores),
  the chunk's fold X_b[c] = sum_i g_row^(R - i) k_(i,c) v_(i,c,b) is accumulated alongside, and the
  two-sided smoothing along the row is one wgmma over the columns:
      S_b <- g_row^R S_b + W X_b,   W[c, c'] = g_col^|c - c'|   (bf16 operands, float32 accumulator).
  XLA scales the reads by g_row^i and adds them to the within-chunk part.

Rows are padded to 64 slots (a warpgroup's wgmma M), so grids up to 64 wide; d up to 64, dv up to
128; bf16 or fp16 inputs. Anything else raises (`unsupported`): use the Triton body there.

Not checked on CPU: interpret mode does not run Mosaic GPU kernels (chunk_mgpu.py says why); the
tests lower them for CUDA with jax.export, their numerics are checked on a GPU by
benchmarks/linear_2d.py (`--bodies mosaic`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lasadgen_jax.ops.lasad.kernels.chunk_mgpu import chunk_group

SLOTS = 64  # slots per row: a warpgroup's wgmma M
MAX_KEY_DIM = 64  # d: [64, d] float32 tiles of q, k and a state held in registers per thread
MAX_VALUE_DIM = 128  # dv: the within-chunk kernel's v tile and accumulator
STATE_BYTES = 128 * 1024  # the column states of one block in shared memory
SHARED_BYTES = 227 * 1024  # a Hopper block's shared-memory limit (Mosaic GPU's check on export)
BARRIER_BYTES = 4096  # barriers and the 1024-byte alignment of swizzled buffers (export measured ~2.8 KB)
WGMMA = plgpu.Layout.WGMMA


def _transforms(dtype):
    """Tiling + 128-byte swizzle: the shared-memory form wgmma reads."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


def _rows(vector, shape):
    """[rows] in the row layout of a WGMMA accumulator, broadcast along its columns."""
    return jax.lax.broadcast_in_dim(vector, shape, [0])


def _row_vector(ref):
    """A [64] float32 shared-memory row as a row vector of a WGMMA accumulator."""
    return plgpu.layout_cast(ref[...], WGMMA.reduce(1))


def _tile(ref):
    """A shared-memory tile in the WGMMA register layout, float32."""
    return plgpu.layout_cast(ref[...], WGMMA).astype(jnp.float32)


def _matmul(a, b, *, transpose_b: bool = False):
    """a @ b (b transposed) in float32 by one wgmma; a a shared-memory ref or a register array."""
    b = plgpu.transpose_ref(b, (1, 0)) if transpose_b else b

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC((a.shape[0], b.shape[1]), jnp.float32))


def _accumulate(initial, a, b):
    """initial + a @ b by one wgmma into an accumulator that starts at `initial` (float32, WGMMA)."""
    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(product)(plgpu.ACC.init(initial))


# ----------------------------------------------------------------------------- what the kernels take


def value_tile(d: int) -> int:
    """Value columns per state block: the widest whose [tile, 64, d] float32 states fit STATE_BYTES."""
    return STATE_BYTES // (SLOTS * d * 4)


def state_kernel_bytes(rows: int, d: int, stages: int) -> int:
    """Shared memory of the state kernel: states, the pipeline's q, k, v and read tiles, W and X."""
    per_stage = rows * SLOTS * (2 * d * 2 + 2 * value_tile(d) * 4)
    return STATE_BYTES + stages * per_stage + 2 * SLOTS * SLOTS * 2 + SLOTS * 4 + BARRIER_BYTES


def within_kernel_bytes(rows: int, d: int, dv: int, stages: int) -> int:
    """Shared memory of the within-chunk kernel: two decay tables, g_row^t, the pipeline's q, k, v, out tiles."""
    per_stage = rows * SLOTS * (2 * d * 2 + dv * 2 + dv * 4)
    return 2 * SLOTS * SLOTS * 4 + rows * SLOTS * 4 + stages * per_stage + BARRIER_BYTES


def within_stages(rows: int, d: int, dv: int) -> int:
    """Pipeline stages of the within-chunk kernel: two where they fit shared memory, else one."""
    return 2 if within_kernel_bytes(rows, d, dv, 2) <= SHARED_BYTES else 1


def unsupported(grid, dtype, d: int, dv: int, rows: int, stages: int) -> str:
    """Why the Mosaic GPU forward cannot take this call ('' if it can); d and dv as given (unpadded)."""
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"the Mosaic GPU body of pallas_linear takes bf16 or fp16 inputs (wgmma), got {jnp.dtype(dtype)}"
    if grid[1] > SLOTS:
        return (f"the Mosaic GPU body of pallas_linear takes grids up to {SLOTS} wide (its column states stay "
                f"in shared memory), got width {grid[1]}; use LinearBlocks(gpu_body='triton')")
    if d > MAX_KEY_DIM or dv > MAX_VALUE_DIM:
        return (f"the Mosaic GPU body of pallas_linear takes d <= {MAX_KEY_DIM} and dv <= {MAX_VALUE_DIM}, "
                f"got d={d}, dv={dv}; use LinearBlocks(gpu_body='triton')")
    dv_pad = padded_value_dim(dv)
    needed = max(state_kernel_bytes(rows, MAX_KEY_DIM, stages), within_kernel_bytes(rows, MAX_KEY_DIM, dv_pad, 1))
    if needed > SHARED_BYTES:
        return (f"the Mosaic GPU body of pallas_linear needs {needed} bytes of shared memory at rows={rows}, "
                f"mosaic_stages={stages}, dv={dv} (limit {SHARED_BYTES}); use fewer rows or stages")
    return ""


def padded_value_dim(dv: int) -> int:
    return -(-dv // SLOTS) * SLOTS


# ----------------------------------------------------------------------------- the pairs inside a chunk


def _within_step(tables, _, q_ref, k_ref, v_ref, out_ref):
    """One chunk of R rows: out_ref[i] <- sum_(j <= i) ((q_i k_j^T) * D_(i-j)) v_j, float32."""
    strict_ref, full_ref, row_power_ref = tables
    rows = q_ref.shape[0] // SLOTS
    row = lambda ref, i: ref.at[pl.ds(i * SLOTS, SLOTS)]
    for i in range(rows):
        acc = None
        for j in range(i + 1):
            scores = _matmul(row(q_ref, i), row(k_ref, j), transpose_b=True)
            if i == j:
                decay = _tile(strict_ref)
            else:
                decay = _tile(full_ref) * _rows(_row_vector(row_power_ref.at[i - j]), scores.shape)
            masked = (scores * decay).astype(q_ref.dtype)
            acc = _matmul(masked, row(v_ref, j)) if acc is None else _accumulate(acc, masked, row(v_ref, j))
        row(out_ref, i)[...] = acc
    plgpu.commit_smem()


def _within_kernel(q_ref, k_ref, v_ref, strict_ref, full_ref, row_power_ref, out_ref, strict_smem, full_smem,
                   row_power_smem, barrier, *, rows: int, group: int, max_concurrent_steps: int):
    """One (batch, head, group of chunks) per block: its head's decay tables into shared memory,
    then a pipeline over the group's chunks."""
    batch, head, part = (jax.lax.axis_index(name) for name in ("batch", "heads", "part"))
    for source, target in ((strict_ref, strict_smem), (full_ref, full_smem), (row_power_ref, row_power_smem)):
        plgpu.copy_gmem_to_smem(source.at[head], target, barrier)
        plgpu.barrier_wait(barrier)
    d, dv = q_ref.shape[-1], v_ref.shape[-1]
    spec = lambda width, dtype: plgpu.BlockSpec((rows * SLOTS, width), lambda c: (c, 0), transforms=_transforms(dtype))
    pipeline = plgpu.emit_pipeline(
        functools.partial(_within_step, (strict_smem, full_smem, row_power_smem)),
        grid=(group,),
        in_specs=[spec(d, q_ref.dtype), spec(d, q_ref.dtype), spec(dv, q_ref.dtype)],
        out_specs=[spec(dv, jnp.float32)],
        max_concurrent_steps=max_concurrent_steps,
    )
    slots = pl.ds(part * group * rows * SLOTS, group * rows * SLOTS)
    at = lambda ref: ref.at[batch, head, slots]
    pipeline(at(q_ref), at(k_ref), at(v_ref), at(out_ref))


def within_tables(log_decay_row, log_decay_col, rows: int):
    """Per head, float32: the strict within-row table [H, 64, 64] (g_col^|c - c'| for c' < c), the
    full one (every c'), and g_row^t repeated over 64 slots [H, R, 64]."""
    slots = jnp.arange(SLOTS)
    distance = jnp.abs(slots[:, None] - slots[None, :]).astype(jnp.float32)
    log_col = log_decay_col.astype(jnp.float32)[:, None, None]
    full = jnp.exp(log_col * distance)
    strict = jnp.where(slots[None, :, None] > slots[None, None, :], full, 0.0)
    row_power = jnp.exp(log_decay_row.astype(jnp.float32)[:, None] * jnp.arange(rows, dtype=jnp.float32))
    return strict, full, jnp.broadcast_to(row_power[:, :, None], (*row_power.shape, SLOTS))


def within_chunks(q, k, v, log_decay_row, log_decay_col, *, rows: int):
    """[B, H, L, dv] float32: the within-chunk pairs, for q, k [B, H, L, d], v [B, H, L, dv]
    (L = rows_pad * 64 slots, rows_pad a multiple of `rows`; d, dv multiples of 64)."""
    batch, heads, length, _ = q.shape
    num_chunks = length // (rows * SLOTS)
    group = chunk_group(num_chunks)
    max_concurrent_steps = within_stages(rows, q.shape[-1], v.shape[-1])
    strict, full, row_power = within_tables(log_decay_row, log_decay_col, rows)
    return plgpu.kernel(
        functools.partial(_within_kernel, rows=rows, group=group, max_concurrent_steps=max_concurrent_steps),
        out_type=jax.ShapeDtypeStruct(v.shape, jnp.float32),
        scratch_types=[plgpu.SMEM((SLOTS, SLOTS), jnp.float32, transforms=_transforms(jnp.float32)),
                       plgpu.SMEM((SLOTS, SLOTS), jnp.float32, transforms=_transforms(jnp.float32)),
                       plgpu.SMEM((rows, SLOTS), jnp.float32), plgpu.Barrier()],
        grid=(batch, heads, num_chunks // group),
        grid_names=("batch", "heads", "part"),
    )(q, k, v, strict, full, row_power)


# ----------------------------------------------------------------------------- the column states


def _state_step(tables, state_smem, fold_smem, _, q_ref, k_ref, v_ref, reads_ref):
    """One chunk: reads_ref[b, i] <- q_i . S_b per column (unscaled), then S_b <- g^R S_b + W X_b."""
    smoothing_ref, chunk_decay_ref = tables
    rows, tile = q_ref.shape[0] // SLOTS, state_smem.shape[0]
    row = lambda ref, i: ref.at[pl.ds(i * SLOTS, SLOTS)]
    for b in range(tile):
        state = _tile(state_smem.at[b])
        fold = None
        for i in range(rows):
            reads_ref[b, i] = jnp.sum(_tile(row(q_ref, i)) * state, axis=1)
            values = plgpu.layout_cast(v_ref[b, i], WGMMA.reduce(1))
            term = _tile(row(k_ref, i)) * _rows(values, state.shape)
            fold = term if fold is None else fold + term
        fold_smem[...] = fold.astype(fold_smem.dtype)
        plgpu.commit_smem()
        decayed = state * _rows(_row_vector(chunk_decay_ref), state.shape)
        state_smem[b] = _accumulate(decayed, smoothing_ref, fold_smem)
    plgpu.commit_smem()


def _state_kernel(q_ref, k_ref, v_ref, smoothing_ref, chunk_decay_ref, reads_ref, smoothing_smem, chunk_decay_smem,
                  state_smem, fold_smem, barrier, *, rows: int, num_chunks: int, max_concurrent_steps: int):
    """One (value tile, head, batch) per block: its head's smoothing matrix W and g_row^R into
    shared memory, zero states, then a pipeline over all chunks carrying the states in shared memory."""
    tile_index, head, batch = (jax.lax.axis_index(name) for name in ("tile", "heads", "batch"))
    for source, target in ((smoothing_ref, smoothing_smem), (chunk_decay_ref, chunk_decay_smem)):
        plgpu.copy_gmem_to_smem(source.at[head], target, barrier)
        plgpu.barrier_wait(barrier)
    tile, d = state_smem.shape[0], state_smem.shape[-1]
    for b in range(tile):
        state_smem[b] = plgpu.layout_cast(jnp.zeros((SLOTS, d), jnp.float32), WGMMA)
    token = lambda dtype: plgpu.BlockSpec((rows * SLOTS, d), lambda c: (c, 0), transforms=_transforms(dtype))
    column = plgpu.BlockSpec((tile, rows, SLOTS), lambda c: (0, c, 0))
    pipeline = plgpu.emit_pipeline(
        functools.partial(_state_step, (smoothing_smem, chunk_decay_smem), state_smem, fold_smem),
        grid=(num_chunks,),
        in_specs=[token(q_ref.dtype), token(k_ref.dtype), column],
        out_specs=[column],
        max_concurrent_steps=max_concurrent_steps,
    )
    block = (batch * q_ref.shape[1] + head) * (v_ref.shape[0] // (q_ref.shape[0] * q_ref.shape[1])) + tile_index
    pipeline(q_ref.at[batch, head], k_ref.at[batch, head], v_ref.at[block], reads_ref.at[block])


def state_reads(q, weighted_k, values_t, log_decay_row, log_decay_col, *, rows: int, max_concurrent_steps: int = 1):
    """[B * H * value tiles, tile, rows_pad, 64] float32: q_(i,c) . C_j[c] per value column,
    unscaled by g_row^i, for q, weighted_k (k * g_row^(R - i)) [B, H, rows_pad * 64, d] and the
    values transposed into tiles, values_t [B * H * value tiles, tile, rows_pad, 64] float32."""
    batch, heads, length, d = q.shape
    tiles, tile = values_t.shape[0] // (batch * heads), values_t.shape[1]
    num_chunks = length // (rows * SLOTS)
    slots = jnp.arange(SLOTS)
    distance = jnp.abs(slots[:, None] - slots[None, :]).astype(jnp.float32)
    smoothing = jnp.exp(log_decay_col.astype(jnp.float32)[:, None, None] * distance).astype(q.dtype)
    chunk_decay = jnp.broadcast_to(jnp.exp(log_decay_row.astype(jnp.float32) * rows)[:, None], (heads, SLOTS))
    return plgpu.kernel(
        functools.partial(_state_kernel, rows=rows, num_chunks=num_chunks, max_concurrent_steps=max_concurrent_steps),
        out_type=jax.ShapeDtypeStruct(values_t.shape, jnp.float32),
        scratch_types=[plgpu.SMEM((SLOTS, SLOTS), q.dtype, transforms=_transforms(q.dtype)),
                       plgpu.SMEM((SLOTS,), jnp.float32),
                       plgpu.SMEM((tile, SLOTS, d), jnp.float32, transforms=_transforms(jnp.float32)),
                       plgpu.SMEM((SLOTS, d), q.dtype, transforms=_transforms(q.dtype)), plgpu.Barrier()],
        grid=(tiles, heads, batch),
        grid_names=("tile", "heads", "batch"),
    )(q, weighted_k, values_t, smoothing, chunk_decay)


# ----------------------------------------------------------------------------- the forward


def _pack(x, grid, rows: int, width: int):
    """[B, N, H, e] -> [B, H, rows_pad, 64, width] (rows padded to a multiple of `rows`, each row to
    64 slots, e to width), zeros in the padding."""
    batch, _, heads, e = x.shape
    h, w = grid
    padded_rows = -(-h // rows) * rows
    x = x.reshape(batch, h, w, heads, e).transpose(0, 3, 1, 2, 4)
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded_rows - h), (0, SLOTS - w), (0, width - e)))


def forward(q, k, v, log_decay_row, log_decay_col, *, grid, rows: int, max_concurrent_steps: int = 1):
    """Float32 [B, N, H, dv]: the cell part of `2d` LASAD (no prefix) for q, k [B, N, H, d],
    v [B, N, H, dv] (bf16 or fp16) on a Hopper GPU; chunks of `rows` rows."""
    batch, n, heads, d = q.shape
    dv = v.shape[-1]
    reason = unsupported(grid, q.dtype, d, dv, rows, max_concurrent_steps)
    if reason:
        raise ValueError(reason)
    dv_pad = padded_value_dim(dv)
    q_p, k_p, v_p = _pack(q, grid, rows, MAX_KEY_DIM), _pack(k, grid, rows, MAX_KEY_DIM), _pack(v, grid, rows, dv_pad)
    padded_rows = q_p.shape[2]
    flat = lambda x: x.reshape(batch, heads, padded_rows * SLOTS, x.shape[-1])
    within = within_chunks(flat(q_p), flat(k_p), flat(v_p), log_decay_row, log_decay_col, rows=rows)
    within = within.reshape(batch, heads, padded_rows, SLOTS, dv_pad)
    log_row = log_decay_row.astype(jnp.float32)[None, :, None, None, None]
    local_row = (jnp.arange(padded_rows) % rows).astype(jnp.float32)[None, None, :, None, None]
    weighted_k = (k_p.astype(jnp.float32) * jnp.exp(log_row * (rows - local_row))).astype(q.dtype)
    tile = value_tile(MAX_KEY_DIM)
    tiles = dv_pad // tile
    values_t = v_p.astype(jnp.float32).reshape(batch, heads, padded_rows, SLOTS, tiles, tile)
    values_t = values_t.transpose(0, 1, 4, 5, 2, 3).reshape(batch * heads * tiles, tile, padded_rows, SLOTS)
    reads = state_reads(flat(q_p), flat(weighted_k), values_t, log_decay_row, log_decay_col, rows=rows,
                        max_concurrent_steps=max_concurrent_steps)
    reads = reads.reshape(batch, heads, tiles, tile, padded_rows, SLOTS).transpose(0, 1, 4, 5, 2, 3)
    out = within + jnp.exp(log_row * local_row) * reads.reshape(batch, heads, padded_rows, SLOTS, dv_pad)
    h, w = grid
    out = out[:, :, :h, :w, :dv].transpose(0, 2, 3, 1, 4)
    return out.reshape(batch, n, heads, dv)
