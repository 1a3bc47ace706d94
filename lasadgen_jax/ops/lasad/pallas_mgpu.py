"""A Mosaic GPU body for the generic kernel's forward (`1d`, `2d_row`, `none`) — UNFINISHED.

Status: lowers through Pallas's Mosaic GPU lowering (tests/test_lasad_pallas.py exports it for
CUDA on the CPU), but has never run on a GPU: its numerics and speed are unmeasured, and nothing
in `impl=...` reaches it. `benchmarks/mosaic_gpu.py` checks it against `chunked` and times it
against the Triton kernel on a GPU. Forward only (no backward), Hopper (wgmma) only.

Why it is not tested on CPU: neither interpret mode of jax 0.10 runs it. The generic one rejects
the swizzled shared-memory transforms that wgmma operands need; Mosaic GPU's own
(`InterpretGPUParams`, private) was tried step by step and lacks, in turn, `plgpu.load` on tiled
refs, `layout_cast`, `run_state`, `transpose_ref` operands and the predicated copies of
`emit_pipeline`'s outputs. (`pl.pallas_call` with a grid, the other way to write it, is deprecated
for Mosaic GPU as of jax 0.10, hence `plgpu.kernel`.)

The kernel is the one-pass walk of pallas_gpu.py in Mosaic GPU's model: a block per (batch,
head) copies its head's decay tables to shared memory, then `plgpu.emit_pipeline` walks the
chunks, TMA-loading the next chunks' q, k, v tiles (`max_concurrent_steps`) while one warpgroup
computes, the d x dv float32 state carried in registers (a WGMMA accumulator). Per chunk
    out   = ((q k^T) * D) v + w_q * (q S)
    S    <- g^L S + k^T (w_k * v)
with D, w_q, w_k, g^L the chunk's decay tables (pallas_chunk: `intra_chunk_decay`,
`generic_weights`), computed per head in XLA before the call — every chunk of a head shares them.
Row scalings ride on the accumulators (w_q, g^L) or on a shared-memory copy of v (w_k), so every
matmul operand is an unscaled tile or a staged copy. Chunks of T = 64 slots (a warpgroup's wgmma
M); head dims padded to multiples of 64 (one 128-byte swizzle row of bf16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lasadgen_jax.ops.lasad import pallas_chunk
from lasadgen_jax.ops.lasad.pallas_chunk import ChunkLayout

CHUNK = 64  # slots per chunk: the wgmma M of one warpgroup
DIM_MULTIPLE = 64  # head dims padded to a 128-byte swizzle row of bf16
VARIANTS = pallas_chunk.GENERIC_VARIANTS
WGMMA = plgpu.Layout.WGMMA


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


def decay_tables(layout: ChunkLayout, log_decay_row, log_decay_col, d: int):
    """Per head: intra-chunk decays [H, T, T], query and key weights [H, T], the chunk decay
    repeated over the state's d rows [H, d]; float32."""
    def one_head(log_row, log_col):
        query_w, key_w, chunk_decay = pallas_chunk.generic_weights(layout, log_row, log_col)
        return (pallas_chunk.intra_chunk_decay(layout, log_row, log_col), query_w[:, 0], key_w[:, 0],
                jnp.full((d,), chunk_decay, jnp.float32))

    return jax.vmap(one_head)(log_decay_row.astype(jnp.float32), log_decay_col.astype(jnp.float32))


def _transforms(dtype):
    """Tiling + 128-byte swizzle: the shared-memory form wgmma reads."""
    return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))


def unsupported(grid, variant: str, dtype) -> str:
    """Why the kernel cannot take this grid, variant and input dtype ('' if it can)."""
    if variant not in VARIANTS:
        return f"the Mosaic GPU kernel covers the variants {VARIANTS}, got {variant!r}"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"the Mosaic GPU kernel takes bf16 or fp16 inputs (wgmma), got {jnp.dtype(dtype)}"
    chunk_tokens = ChunkLayout.make(grid, variant, CHUNK).chunk_tokens
    if chunk_tokens != CHUNK:
        return (f"the Mosaic GPU kernel needs {CHUNK}-slot chunks; grid {tuple(grid)} with variant {variant!r} gives "
                f"{chunk_tokens} (rows wider than {CHUNK}, or fewer than {CHUNK} tokens)")
    return ""


def forward(q, k, v, log_decay_row, log_decay_col, *, grid, variant: str, max_concurrent_steps: int = 2):
    """The cell output [B, N, H, dv] for q, k [B, N, H, d], v [B, N, H, dv] (bf16 or fp16; no
    prefix) on a Hopper GPU. Forward only."""
    reason = unsupported(grid, variant, q.dtype)
    if reason:
        raise ValueError(reason)
    layout = ChunkLayout.make(grid, variant, CHUNK)
    d, dv = q.shape[-1], v.shape[-1]
    d_pad, dv_pad = (-(-size // DIM_MULTIPLE) * DIM_MULTIPLE for size in (d, dv))
    pad = lambda x, size: jnp.pad(layout.pack(x), ((0, 0),) * 3 + ((0, size - x.shape[-1]),))
    q_p, k_p, v_p = pad(q, d_pad), pad(k, d_pad), pad(v, dv_pad)
    batch, length, heads, _ = q_p.shape
    decay, query_w, key_w, chunk_w = decay_tables(layout, log_decay_row, log_decay_col, d_pad)
    out = plgpu.kernel(
        functools.partial(_kernel, num_chunks=layout.num_chunks, max_concurrent_steps=max_concurrent_steps),
        out_type=jax.ShapeDtypeStruct((batch, length, heads, dv_pad), q.dtype),
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
