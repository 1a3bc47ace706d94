"""Mosaic GPU (Hopper) bodies of the generic kernel (`1d`, `2d_row`, `none`): the forward (one
pass, or the output pass of the two-pass forward) and the chunk backward's gradient step.

`ChunkOptions(gpu_lowering=...)` picks them (chunk.py): "auto", the default, runs them on a Hopper
GPU wherever they apply (bf16/fp16 inputs, 64-slot chunks, head dims up to 128), "mosaic" always
(raising where they do not apply), "triton" never. The two sequential passes (every chunk's
starting state; the adjoints) stay the Triton kernels of chunk_gpu.py, whose outputs these read.
Checked and timed on a Hopper GPU (benchmarks/mosaic_gpu.py, benchmarks/kernels.py; RESULTS.md,
"Mosaic GPU bodies of the generic kernel"): forward and every gradient against `chunked` and the Triton kernels, every
output element written.

Why they are not checked on CPU: neither interpret mode of jax 0.10 runs them. The generic one
rejects the swizzled shared-memory transforms that wgmma operands need; Mosaic GPU's own
(`InterpretGPUParams`, private) lacks, in turn, `plgpu.load` on tiled refs, `layout_cast`,
`run_state`, `transpose_ref` operands and the predicated copies of `emit_pipeline`'s outputs. The
tests export them for CUDA on the CPU (Pallas's Mosaic GPU lowering, shared-memory budgets
included); their numerics need a GPU. (`pl.pallas_call` with a grid, the other way to write
them, is deprecated for Mosaic GPU as of jax 0.10, hence `plgpu.kernel`.)

Forward, one pass: a block per (batch, head) copies its head's decay tables to shared memory,
then `plgpu.emit_pipeline` walks the chunks, TMA-loading the next chunks' q, k, v tiles
(`max_concurrent_steps`) while one warpgroup computes, the d x dv float32 state carried in
registers (a WGMMA accumulator). Per chunk
    out   = ((q k^T) * D) v + w_q * (q S)
    S    <- g^L S + k^T (w_k * v)
with D, w_q, w_k, g^L the chunk's decay tables (chunk_math: `intra_chunk_decay`,
`generic_weights`), computed per head in XLA before the call — every chunk of a head shares them.
Row scalings ride on the accumulators (w_q, g^L) or on a shared-memory copy of v (w_k), so every
matmul operand is an unscaled tile or a staged copy. From `parallel_chunks` chunks on, the Triton
state pass writes every chunk's starting state and a block per (batch, head, 8 chunks) computes
the outputs (`_output_kernel`), as the Triton two-pass forward does.

Gradient step (chunk_math.generic_gradients at T = 64): a block per (batch, head, 8 chunks),
its head's tables in shared memory, a pipeline over the chunks loading q, k, v, do and the
chunk's state and adjoint. The within-chunk products are formed key-major (k q^T, v do^T) so that
dS^T and P^T are wgmma operands straight from registers (dk = dS^T q, dv = P^T do); dq = dS k
reads dS^T back from shared memory, transposed. The decay gradients leave as per-slot shares
(summed in XLA): each pair's share times its exponent factor, and the chunk-crossing terms.

Chunks of T = 64 slots (a warpgroup's wgmma M); head dims padded to multiples of 64 (one
128-byte swizzle row of bf16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lasadgen_jax.ops.lasad import chunk_math
from lasadgen_jax.ops.lasad.chunk_math import ChunkLayout
from lasadgen_jax.ops.lasad.kernels import chunk_gpu
from lasadgen_jax.ops.lasad.kernels.backend import stack_decays
from lasadgen_jax.ops.lasad.kernels.chunk_config import BlockSizes, ChunkOptions

CHUNK = 64  # slots per chunk: the wgmma M of one warpgroup
DIM_MULTIPLE = 64  # head dims padded to a 128-byte swizzle row of bf16
MAX_DIM = 128  # head dims up to this: two 128-wide pipeline stages of the gradient kernel exceed shared memory
VARIANTS = chunk_math.GENERIC_VARIANTS
WGMMA = plgpu.Layout.WGMMA


def _transforms(dtype):
    """Tiling + 128-byte swizzle: the shared-memory form wgmma reads."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


def _rows(vector, shape):
    """[rows] in the row layout of a WGMMA accumulator, broadcast along its columns."""
    return jax.lax.broadcast_in_dim(vector, shape, [0])


def _matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
    """a @ b (or with a / b transposed) in float32 by one wgmma into a fresh accumulator; a is a
    shared-memory ref or a register array, b a shared-memory ref."""
    a = plgpu.transpose_ref(a, (1, 0)) if transpose_a else a
    b = plgpu.transpose_ref(b, (1, 0)) if transpose_b else b

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC((a.shape[0], b.shape[1]), jnp.float32))


def _rows_of(ref):
    """A [T] float32 table in shared memory as a row vector of a WGMMA accumulator."""
    return plgpu.layout_cast(ref[...], WGMMA.reduce(1))


def _tile_of(ref):
    """A shared-memory tile in the WGMMA register layout, float32."""
    return plgpu.layout_cast(ref[...], WGMMA).astype(jnp.float32)


def _accumulate(initial, a, b):
    """initial + a @ b: one wgmma into an accumulator that starts at `initial` (float32, WGMMA)."""
    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(product)(plgpu.ACC.init(initial))


# ----------------------------------------------------------------------------- what the kernels take


def unsupported(grid, variant: str, dtype, d: int = DIM_MULTIPLE, dv: int = DIM_MULTIPLE) -> str:
    """Why the kernels cannot take this grid, variant, input dtype and head dims ('' if they can)."""
    if max(d, dv) > MAX_DIM:
        return f"the Mosaic GPU kernels take head dims up to {MAX_DIM}, got d={d}, dv={dv}"
    if variant not in VARIANTS:
        return f"the Mosaic GPU kernel covers the variants {VARIANTS}, got {variant!r}"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"the Mosaic GPU kernel takes bf16 or fp16 inputs (wgmma), got {jnp.dtype(dtype)}"
    chunk_tokens = ChunkLayout.make(grid, variant, CHUNK).chunk_tokens
    if chunk_tokens != CHUNK:
        return (f"the Mosaic GPU kernel needs {CHUNK}-slot chunks; grid {tuple(grid)} with variant {variant!r} gives "
                f"{chunk_tokens} (rows wider than {CHUNK}, or fewer than {CHUNK} tokens)")
    return ""


def mosaic_padded_dim(size: int) -> int:
    """A head dim padded to a multiple of 64 (at most MAX_DIM, so also a power of two: the Triton
    passes these kernels share need one)."""
    return -(-size // DIM_MULTIPLE) * DIM_MULTIPLE


# ----------------------------------------------------------------------------- forward


def _chunk_step(tables, state_in_ref, weighted_v_ref, _, q_ref, k_ref, v_ref, out_ref, state):
    """One chunk: out_ref <- its outputs; returns the next state (float32, WGMMA layout)."""
    decay_ref, query_w_ref, key_w_ref, chunk_w_ref = tables
    load = lambda ref, layout: plgpu.layout_cast(ref[...], layout)
    masked = _matmul(q_ref, k_ref, transpose_b=True) * load(decay_ref, WGMMA)
    state_in_ref[...] = state.astype(state_in_ref.dtype)  # the state as a matmul operand
    v = load(v_ref, WGMMA).astype(jnp.float32)
    weighted_v_ref[...] = (v * _rows(load(key_w_ref, WGMMA.reduce(1)), v.shape)).astype(weighted_v_ref.dtype)
    plgpu.commit_smem()
    read = _matmul(q_ref, state_in_ref)
    read = read * _rows(load(query_w_ref, WGMMA.reduce(1)), read.shape)
    within = _matmul(masked.astype(q_ref.dtype), v_ref)
    out_ref[...] = (read + within).astype(out_ref.dtype)
    plgpu.commit_smem()
    new_keys = _matmul(k_ref, weighted_v_ref, transpose_a=True)
    return state * _rows(load(chunk_w_ref, WGMMA.reduce(1)), state.shape) + new_keys


def _kernel(q_ref, k_ref, v_ref, decay_ref, query_w_ref, key_w_ref, chunk_w_ref, out_ref,
            decay_smem, query_w_smem, key_w_smem, chunk_w_smem, state_in_smem, weighted_v_smem, barrier,
            *, num_chunks: int, max_concurrent_steps: int):
    """One (batch, head) per block: its decay tables into shared memory once, then a pipeline over
    the chunks (TMA loads of the next chunks while this one computes) carrying the state."""
    batch, head = jax.lax.axis_index("batch"), jax.lax.axis_index("heads")
    tables = (decay_smem, query_w_smem, key_w_smem, chunk_w_smem)
    for source, target in zip((decay_ref, query_w_ref, key_w_ref, chunk_w_ref), tables):
        plgpu.copy_gmem_to_smem(source.at[head], target, barrier)
        plgpu.barrier_wait(barrier)
    d, dv = q_ref.shape[-1], v_ref.shape[-1]
    tile = lambda width, dtype: plgpu.BlockSpec((CHUNK, width), lambda c: (c, 0), transforms=_transforms(dtype))
    dtype = q_ref.dtype
    pipeline = plgpu.emit_pipeline(
        functools.partial(_chunk_step, tables, state_in_smem, weighted_v_smem),
        grid=(num_chunks,),
        in_specs=[tile(d, dtype), tile(d, dtype), tile(dv, dtype)],
        out_specs=[tile(dv, dtype)],
        max_concurrent_steps=max_concurrent_steps,
        init_carry=plgpu.layout_cast(jnp.zeros((d, dv), jnp.float32), WGMMA),
    )
    at = lambda ref: ref.at[batch, :, head, :]
    pipeline(at(q_ref), at(k_ref), at(v_ref), at(out_ref))


def _output_step(tables, _, q_ref, k_ref, v_ref, state_ref, out_ref):
    """One chunk of the two-pass forward's output pass, given its starting state (bf16/fp16)."""
    decay_ref, query_w_ref = tables
    masked = _matmul(q_ref, k_ref, transpose_b=True) * _tile_of(decay_ref)
    read = _matmul(q_ref, state_ref)
    read = read * _rows(_rows_of(query_w_ref), read.shape)
    out_ref[...] = _accumulate(read, masked.astype(q_ref.dtype), v_ref).astype(out_ref.dtype)
    plgpu.commit_smem()


def _output_kernel(q_ref, k_ref, v_ref, states_ref, decay_ref, query_w_ref, out_ref, decay_smem, query_w_smem,
                   barrier, *, group: int, max_concurrent_steps: int):
    """One (batch, head, group of chunks) per block: the outputs of its chunks, in a pipeline."""
    batch, head, part = (jax.lax.axis_index(name) for name in ("batch", "heads", "part"))
    for source, target in ((decay_ref, decay_smem), (query_w_ref, query_w_smem)):
        plgpu.copy_gmem_to_smem(source.at[head], target, barrier)
        plgpu.barrier_wait(barrier)
    d, dv = q_ref.shape[-1], v_ref.shape[-1]
    tile = lambda rows, width: plgpu.BlockSpec((rows, width), lambda c: (c, 0), transforms=_transforms(q_ref.dtype))
    pipeline = plgpu.emit_pipeline(
        functools.partial(_output_step, (decay_smem, query_w_smem)),
        grid=(group,),
        in_specs=[tile(CHUNK, d), tile(CHUNK, d), tile(CHUNK, dv), tile(d, dv)],
        out_specs=[tile(CHUNK, dv)],
        max_concurrent_steps=max_concurrent_steps,
    )
    slots, state_rows = pl.ds(part * group * CHUNK, group * CHUNK), pl.ds(part * group * d, group * d)
    tokens = lambda ref: ref.at[batch, slots, head, :]
    pipeline(tokens(q_ref), tokens(k_ref), tokens(v_ref), states_ref.at[batch, head, state_rows, :], tokens(out_ref))


def decay_tables(layout: ChunkLayout, log_decay_row, log_decay_col, d: int):
    """Per head: intra-chunk decays [H, T, T], query and key weights [H, T], the chunk decay
    repeated over the state's d rows [H, d]; float32."""
    def one_head(log_row, log_col):
        query_w, key_w, chunk_decay = chunk_math.generic_weights(layout, log_row, log_col)
        return (chunk_math.intra_chunk_decay(layout, log_row, log_col), query_w[:, 0], key_w[:, 0],
                jnp.full((d,), chunk_decay, jnp.float32))

    return jax.vmap(one_head)(log_decay_row.astype(jnp.float32), log_decay_col.astype(jnp.float32))


def forward(q, k, v, log_decay_row, log_decay_col, *, grid, variant: str, max_concurrent_steps: int = 2,
            tiles: BlockSizes | None = None, options: ChunkOptions | None = None):
    """The cell output [B, N, H, dv] for q, k [B, N, H, d], v [B, N, H, dv] (bf16 or fp16; no
    prefix) on a Hopper GPU.

    Below `options.parallel_chunks` chunks (default ChunkOptions()) one pass: a block per
    (batch, head) walks its chunks carrying the state. From there on two passes, as the Triton
    kernel: its state pass (chunk_gpu.chunk_states, with `tiles`' launch parameters) writes
    every chunk's starting state, then Mosaic GPU blocks of 8 chunks compute the outputs in parallel."""
    reason = unsupported(grid, variant, q.dtype, q.shape[-1], v.shape[-1])
    if reason:
        raise ValueError(reason)
    tiles = BlockSizes() if tiles is None else tiles
    options = ChunkOptions() if options is None else options
    layout = ChunkLayout.make(grid, variant, CHUNK)
    d, dv = q.shape[-1], v.shape[-1]
    d_pad, dv_pad = mosaic_padded_dim(d), mosaic_padded_dim(dv)
    pad = lambda x, size: jnp.pad(layout.pack(x), ((0, 0),) * 3 + ((0, size - x.shape[-1]),))
    q_p, k_p, v_p = pad(q, d_pad), pad(k, d_pad), pad(v, dv_pad)
    batch, length, heads, _ = q_p.shape
    decay, query_w, key_w, chunk_w = decay_tables(layout, log_decay_row, log_decay_col, d_pad)
    out_type = jax.ShapeDtypeStruct((batch, length, heads, dv_pad), q.dtype)
    if layout.num_chunks >= options.parallel_chunks:
        decays = stack_decays(log_decay_row, log_decay_col)
        states = chunk_gpu.chunk_states(k_p, v_p, decays, layout=layout, tiles=tiles, interpret=False)
        group = chunk_group(layout.num_chunks)
        out = plgpu.kernel(
            functools.partial(_output_kernel, group=group, max_concurrent_steps=max_concurrent_steps),
            out_type=out_type,
            scratch_types=[plgpu.SMEM((CHUNK, CHUNK), jnp.float32, transforms=_transforms(jnp.float32)),
                           plgpu.SMEM((CHUNK,), jnp.float32), plgpu.Barrier()],
            grid=(batch, heads, layout.num_chunks // group),
            grid_names=("batch", "heads", "part"),
        )(q_p, k_p, v_p, states, decay, query_w)
        return layout.unpack(out)[..., :dv]
    out = plgpu.kernel(
        functools.partial(_kernel, num_chunks=layout.num_chunks, max_concurrent_steps=max_concurrent_steps),
        out_type=out_type,
        scratch_types=[plgpu.SMEM((CHUNK, CHUNK), jnp.float32, transforms=_transforms(jnp.float32)),
                        plgpu.SMEM((CHUNK,), jnp.float32), plgpu.SMEM((CHUNK,), jnp.float32),
                        plgpu.SMEM((d_pad,), jnp.float32),
                        plgpu.SMEM((d_pad, dv_pad), q.dtype, transforms=_transforms(q.dtype)),
                        plgpu.SMEM((CHUNK, dv_pad), q.dtype, transforms=_transforms(q.dtype)),
                        plgpu.Barrier()],
        grid=(batch, heads),
        grid_names=("batch", "heads"),
    )(q_p, k_p, v_p, decay, query_w, key_w, chunk_w)
    return layout.unpack(out)[..., :dv]


# ----------------------------------------------------------------------------- the chunk backward's gradient step


SHARES = {"1d": ("col",), "2d_row": ("row", "col"), "none": ()}  # the decay-gradient shares each variant has


def _gradient_step(tables, scores_t_smem, variant, whole_in_kernel, _, q_ref, k_ref, v_ref, d_out_ref, state_ref,
                   adjoint_ref, dq_ref, dk_ref, dv_ref, *share_refs):
    """One chunk's dq, dk, dv and per-slot shares of the decay gradients (chunk_math.
    generic_gradients, with T = 64 slots, one sub-block). The within-chunk products are formed
    key-major (rows: keys m, columns: queries a) so that their transposes are wgmma operands in
    registers; dq reads the transposed dS back from shared memory."""
    dtype = q_ref.dtype
    decays = variant != "none"
    scores_t = _matmul(k_ref, q_ref, transpose_b=True)  # [m, a] = k_m . q_a
    d_out_v_t = _matmul(v_ref, d_out_ref, transpose_b=True)  # [m, a] = v_m . do_a
    decay_t = _tile_of(tables["decay_t"])
    probs_t, d_scores_t = scores_t * decay_t, d_out_v_t * decay_t
    weighted = lambda x, name: x * _rows(_rows_of(tables[name]), x.shape) if decays else x
    # dk = dS^T q + w_k * (v E^T), dv = P^T do + w_k * (k E): the chunk-crossing parts first
    dk_cross = weighted(_matmul(v_ref, adjoint_ref, transpose_b=True), "key_w")
    dk = _accumulate(dk_cross, d_scores_t.astype(dtype), q_ref)
    d_v = _accumulate(weighted(_matmul(k_ref, adjoint_ref), "key_w"), probs_t.astype(dtype), d_out_ref)
    # dq = dS k + w_q * (do S^T), dS read back transposed from shared memory
    scores_t_smem[...] = d_scores_t.astype(dtype)
    plgpu.commit_smem()
    dq_cross = weighted(_matmul(d_out_ref, state_ref, transpose_b=True), "query_w")
    dq = _accumulate(dq_cross, plgpu.transpose_ref(scores_t_smem, (1, 0)), k_ref)
    if decays:
        pair_t = scores_t * d_out_v_t * decay_t  # each pair's share of the loss, P * (do v^T)
        crossing = (jnp.sum(_tile_of(q_ref) * dq_cross, axis=1) * _rows_of(tables["steps"])
                    + jnp.sum(_tile_of(k_ref) * dk_cross, axis=1) * _rows_of(tables["rest"]))
        if whole_in_kernel:  # length * g^length * <E_c, S_c>, one entry per state row (d = T)
            overlap = jnp.sum(_tile_of(adjoint_ref) * _tile_of(state_ref), axis=1)
            crossing = crossing + overlap * _rows_of(tables["whole"])
        factor_t = _tile_of(tables["factor_t"])
        if variant == "1d":
            (col_ref,) = share_refs
            col_ref[...] = jnp.sum(pair_t * factor_t, axis=1) + crossing
        else:  # 2d_row: column distances >= 0 on same-row pairs, minus row distances on the others
            row_ref, col_ref = share_refs
            col_ref[...] = jnp.sum(pair_t * jnp.maximum(factor_t, 0.0), axis=1)
            row_ref[...] = jnp.sum(pair_t * jnp.maximum(-factor_t, 0.0), axis=1) + crossing  # chunks are whole rows
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = d_v.astype(dv_ref.dtype)
    plgpu.commit_smem()


def _gradient_kernel(q_ref, k_ref, v_ref, d_out_ref, states_ref, *rest, variant: str, table_names, group: int,
                     max_concurrent_steps: int, whole_in_kernel: bool):
    """One (batch, head, group of chunks) per block: its head's tables into shared memory, then a
    pipeline over the group's chunks."""
    num_tables, num_outputs = len(table_names), 3 + len(SHARES[variant])
    tables_gmem, outputs = rest[:num_tables], rest[num_tables:num_tables + num_outputs]
    tables_smem, scores_t_smem, barrier = rest[num_tables + num_outputs:]
    batch, head, part = (jax.lax.axis_index(name) for name in ("batch", "heads", "part"))
    for source, target in zip(tables_gmem, tables_smem):
        plgpu.copy_gmem_to_smem(source.at[head], target, barrier)
        plgpu.barrier_wait(barrier)
    tables = dict(zip(table_names, tables_smem))
    d, dv = q_ref.shape[-1], v_ref.shape[-1]
    dtype = q_ref.dtype
    tile = lambda rows, width: plgpu.BlockSpec((rows, width), lambda c: (c, 0), transforms=_transforms(dtype))
    share = plgpu.BlockSpec((CHUNK,), lambda c: (c,))
    pipeline = plgpu.emit_pipeline(
        functools.partial(_gradient_step, tables, scores_t_smem, variant, whole_in_kernel),
        grid=(group,),
        in_specs=[tile(CHUNK, d), tile(CHUNK, d), tile(CHUNK, dv), tile(CHUNK, dv), tile(d, dv), tile(d, dv)],
        out_specs=[tile(CHUNK, d), tile(CHUNK, d), tile(CHUNK, dv)] + [share] * len(SHARES[variant]),
        max_concurrent_steps=max_concurrent_steps,
    )
    slots, state_rows = pl.ds(part * group * CHUNK, group * CHUNK), pl.ds(part * group * d, group * d)
    tokens = lambda ref: ref.at[batch, slots, head, :]
    matrices = lambda which: states_ref.at[which, batch, head, state_rows, :]
    shares = [ref.at[batch, head, slots] for ref in outputs[3:]]
    pipeline(tokens(q_ref), tokens(k_ref), tokens(v_ref), tokens(d_out_ref), matrices(0), matrices(1),
             *(tokens(ref) for ref in outputs[:3]), *shares)


def gradient_tables(layout: ChunkLayout, log_decay_row, log_decay_col, d: int) -> dict:
    """Per head, float32, what the gradient kernel reads: the intra-chunk decays key-major
    ("decay_t" [H, T, T], D^T) and, for the decayed variants, each pair's exponent factor,
    key-major ("factor_t": the column distance, and for `2d_row` minus the row distance on pairs
    of different rows: the two never overlap, so one table holds both), the query and key weights
    [H, T], each slot's steps from its chunk start and to its chunk end [H, T], and length *
    g^length repeated over d [H, d]."""
    t, variant = layout.chunk_tokens, layout.variant

    def one_head(log_row, log_col):
        decay = chunk_math.intra_chunk_decay(layout, log_row, log_col)
        if variant == "none":
            return {"decay_t": decay.T}
        row_factor, col_factor = chunk_math.intra_exponent_factors(layout, 0, t, 0, t)
        query_w, key_w, chunk_decay = chunk_math.generic_weights(layout, log_row, log_col)
        _, steps, length = chunk_math.generic_steps(layout, log_row, log_col)
        return {"decay_t": decay.T, "factor_t": (col_factor - row_factor).T, "query_w": query_w[:, 0],
                "key_w": key_w[:, 0], "steps": steps[:, 0], "rest": (length - steps)[:, 0],
                "whole": jnp.full((d,), length * chunk_decay, jnp.float32)}

    return jax.vmap(one_head)(log_decay_row.astype(jnp.float32), log_decay_col.astype(jnp.float32))


def chunk_group(num_chunks: int, target: int = 8) -> int:
    """Chunks per block of the gradient kernel: the largest power of two <= target dividing num_chunks."""
    group = target
    while num_chunks % group:
        group //= 2
    return group


def chunk_gradients(q, k, v, d_out, states, log_decay_row, log_decay_col, *, layout: ChunkLayout,
                    chunks_per_block: int = 8, max_concurrent_steps: int | None = None):
    """The chunk backward's gradient step (chunk_gpu.chunk_gradients' third step) on a Hopper GPU.

    q, k [B, L, H, d], v, d_out [B, L, H, dv]: packed into 64-slot chunks, head dims multiples of
    64, bf16 or fp16; states: [2, B, H, C * d, dv], every chunk's starting state and the adjoint
    dL/d(next chunk's starting state) (chunk_gpu.states_and_adjoints). Returns (dq, dk, dv) in
    q.dtype and the log-decay gradients (row, column) [H] float32. max_concurrent_steps: pipeline
    stages (default 2 for head dims of 64, else 1: two stages of 128-wide tiles exceed shared memory)."""
    batch, length, heads, d = q.shape
    dv = v.shape[-1]
    chunks = layout.num_chunks
    if layout.chunk_tokens != CHUNK or length != chunks * CHUNK:
        raise ValueError(f"the Mosaic GPU gradient kernel needs {CHUNK}-slot chunks, got {layout.chunk_tokens} "
                         f"slots and {length} packed tokens")
    if d % DIM_MULTIPLE or dv % DIM_MULTIPLE:
        raise ValueError(f"the Mosaic GPU gradient kernel needs head dims padded to multiples of {DIM_MULTIPLE}, "
                         f"got d={d}, dv={dv}")
    variant = layout.variant
    if max_concurrent_steps is None:
        max_concurrent_steps = 2 if max(d, dv) <= DIM_MULTIPLE else 1
    group = chunk_group(chunks, chunks_per_block)
    whole_in_kernel = variant != "none" and d == CHUNK  # else the whole-chunk term is added in XLA below
    tables = gradient_tables(layout, log_decay_row, log_decay_col, d)
    outs = gradient_call(q, k, v, d_out, states, tables, layout=layout, group=group,
                         max_concurrent_steps=max_concurrent_steps, whole_in_kernel=whole_in_kernel)
    dq, dk, d_v = outs[:3]
    if variant == "none":
        zero = jnp.zeros((heads,), jnp.float32)
        return dq, dk, d_v, zero, zero
    shares = dict(zip(SHARES[variant], (jnp.sum(share, axis=(0, 2)) for share in outs[3:])))
    d_row, d_col = shares.get("row", jnp.zeros((heads,), jnp.float32)), shares["col"]
    if not whole_in_kernel:
        overlap = jnp.einsum("bhcde,bhcde->h", *(x.reshape(batch, heads, chunks, d, dv).astype(jnp.float32)
                                                 for x in (states[0], states[1])))
        log_step, _, chunk_length = chunk_math.generic_steps(layout, log_decay_row.astype(jnp.float32),
                                                                   log_decay_col.astype(jnp.float32))
        whole = chunk_length * jnp.exp(log_step * chunk_length) * overlap
        d_row, d_col = (d_row + whole, d_col) if variant == "2d_row" else (d_row, d_col + whole)
    return dq, dk, d_v, d_row, d_col


def gradient_call(q, k, v, d_out, states, tables, *, layout, group, max_concurrent_steps, whole_in_kernel):
    """The gradient kernel's launch: (dq, dk, dv, *per-slot decay shares [B, H, L])."""
    batch, length, heads, d = q.shape
    variant = layout.variant
    names = tuple(tables)
    table_smem = [plgpu.SMEM(tables[name].shape[1:], jnp.float32,
                             transforms=_transforms(jnp.float32) if tables[name].ndim == 3 else ())
                  for name in names]
    out_types = [jax.ShapeDtypeStruct(x.shape, q.dtype) for x in (q, k, v)]
    out_types += [jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)] * len(SHARES[variant])
    return plgpu.kernel(
        functools.partial(_gradient_kernel, variant=variant, table_names=names, group=group,
                          max_concurrent_steps=max_concurrent_steps, whole_in_kernel=whole_in_kernel),
        out_type=out_types,
        scratch_types=[table_smem, plgpu.SMEM((CHUNK, CHUNK), q.dtype, transforms=_transforms(q.dtype)),
                       plgpu.Barrier()],
        grid=(batch, heads, layout.num_chunks // group),
        grid_names=("batch", "heads", "part"),
    )(q, k, v, d_out, states, *(tables[name] for name in names))
