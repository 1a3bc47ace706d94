"""The linear-time `2d` kernel's TPU body (Mosaic TPU; docs/lasad.md §8).

One program per (batch, head, value tile) walks the row chunks as the last grid axis, marked
"arbitrary" (sequential on one core), with all w column states (forward) or both adjoints
(reverse sweep) in VMEM scratch, zeroed at the first step. Inputs are heads-major [B, H, L, e]
with head dims padded to 128 lanes (value tiles of 128). The reverse sweep's index maps walk the
chunks from the last.

Tested in interpret mode on CPU and lowered to Mosaic through jax.export; it has never run on a
TPU (Mosaic's later layout passes, the strided sublane loads and the VMEM budget are unverified).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lasadgen_jax.ops.lasad.kernels.linear_2d_chunk import (
    ChunkGeometry,
    backward_chunk,
    forward_chunk,
)

LANES = 128
# Scoped VMEM asked for beyond the states: the chunk's blocks (double-buffered) and temporaries.
VMEM_HEADROOM = 16 * 2**20


def _no_barrier():
    """Mosaic orders a program's own VMEM and output-block accesses."""


def _forward_kernel(decay_ref, q_ref, k_ref, v_ref, previous_k_ref, previous_v_ref, out_ref, state_ref, *,
                    geometry: ChunkGeometry):
    head, chunk = pl.program_id(1), pl.program_id(3)

    @pl.when(chunk == 0)
    def _():
        state_ref[...] = jnp.zeros(state_ref.shape, jnp.float32)

    forward_chunk((q_ref, k_ref, v_ref, out_ref), (previous_k_ref, previous_v_ref), state_ref, (0, 0), chunk,
                  decay_ref[head, 0], decay_ref[head, 1], geometry=geometry, barrier=_no_barrier)


def _vmem_params(state_bytes: int, semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=state_bytes + VMEM_HEADROOM)


def forward(q, k, v, decays, *, geometry: ChunkGeometry, num_chunks: int, interpret: bool, name: str = ""):
    """Float32 [B, H, L, dv] (no prefix) from packed heads-major q, k [B, H, L, d], v [B, H, L, dv]
    (L = num_chunks * R * wp, d and dv multiples of 128); decays [H, 2] float32."""
    batch, heads, length, d = q.shape
    dv = v.shape[-1]
    t = geometry.rows * geometry.row_slots
    key_spec = pl.BlockSpec((None, None, t, d), lambda b, h, j, c: (b, h, c, 0))
    value_spec = pl.BlockSpec((None, None, t, LANES), lambda b, h, j, c: (b, h, c, j))
    # The previous chunk's keys and values (its row fold's second half is added in this chunk).
    previous_key_spec = pl.BlockSpec((None, None, t, d), lambda b, h, j, c: (b, h, jnp.maximum(c - 1, 0), 0))
    previous_value_spec = pl.BlockSpec((None, None, t, LANES), lambda b, h, j, c: (b, h, jnp.maximum(c - 1, 0), j))
    state_bytes = geometry.width * d * LANES * 4
    return pl.pallas_call(
        functools.partial(_forward_kernel, geometry=geometry),
        out_shape=jax.ShapeDtypeStruct((batch, heads, length, dv), jnp.float32),
        grid=(batch, heads, dv // LANES, num_chunks),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), key_spec, key_spec, value_spec, previous_key_spec,
                  previous_value_spec],
        out_specs=value_spec,
        scratch_shapes=[pltpu.VMEM((geometry.width, d, LANES), jnp.float32)],
        compiler_params=_vmem_params(state_bytes, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"lasad_linear_2d{name}",
    )(decays, q, k, v, k, v)


def _sweep_kernel(decay_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, d_decay_ref, adjoint_ref, adjoint_row_ref,
                  *, geometry: ChunkGeometry):
    head = pl.program_id(1)

    @pl.when(pl.program_id(3) == 0)
    def _():
        adjoint_ref[...] = jnp.zeros(adjoint_ref.shape, jnp.float32)
        adjoint_row_ref[...] = jnp.zeros(adjoint_row_ref.shape, jnp.float32)

    d_row, d_col = backward_chunk((q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref), (adjoint_ref, adjoint_row_ref), 0,
                                  decay_ref[head, 0], decay_ref[head, 1], geometry=geometry, barrier=_no_barrier)
    lane = jax.lax.broadcasted_iota(jnp.int32, d_decay_ref.shape, 1)
    d_decay_ref[...] = jnp.where(lane == 0, d_row, jnp.where(lane == 1, d_col, 0.0))


def reverse_sweep(q, k, v, d_out, decays, *, geometry: ChunkGeometry, num_chunks: int, interpret: bool):
    """(dk [B, H, L, d] float32 summed over value tiles, dv [B, H, L, dv] float32, the log-decay
    gradients [H, 2] float32) from packed heads-major inputs as `forward`'s (d_out like v)."""
    batch, heads, length, d = q.shape
    dv = v.shape[-1]
    t = geometry.rows * geometry.row_slots
    value_tiles = dv // LANES
    chunk = lambda c: num_chunks - 1 - c
    key_spec = pl.BlockSpec((None, None, t, d), lambda b, h, j, c: (b, h, chunk(c), 0))
    value_spec = pl.BlockSpec((None, None, t, LANES), lambda b, h, j, c: (b, h, chunk(c), j))
    dk_spec = pl.BlockSpec((None, None, None, t, d), lambda b, h, j, c: (j, b, h, chunk(c), 0))
    decay_spec = pl.BlockSpec((None, None, None, None, 1, LANES), lambda b, h, j, c: (b, h, j, chunk(c), 0, 0))
    adjoint = pltpu.VMEM((geometry.width, d, LANES), jnp.float32)
    state_bytes = 2 * geometry.width * d * LANES * 4
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    dk, d_v, d_decays = pl.pallas_call(
        functools.partial(_sweep_kernel, geometry=geometry),
        out_shape=[f32(value_tiles, batch, heads, length, d), f32(batch, heads, length, dv),
                   f32(batch, heads, value_tiles, num_chunks, 1, LANES)],
        grid=(batch, heads, value_tiles, num_chunks),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), key_spec, key_spec, value_spec, value_spec],
        out_specs=[dk_spec, value_spec, decay_spec],
        scratch_shapes=[adjoint, adjoint],
        compiler_params=_vmem_params(state_bytes, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="lasad_linear_2d_sweep",
    )(decays, q, k, v, d_out)
    return jnp.sum(dk, axis=0), d_v, jnp.sum(d_decays[..., 0, :2], axis=(0, 2, 3))
