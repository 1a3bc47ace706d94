"""LASAD kernels for GPUs, lowered through Triton (`jax.experimental.pallas.triton`).

One program per (batch, head, value tile) walks its chunks in order inside the kernel, the state
carried by the loop (registers), so no state ever goes to HBM. For long sequences the generic
kernel instead runs two passes (`_two_pass`): chunk starting states (d x dv floats per chunk, in
HBM), then every chunk in parallel. Inputs stay in the op's layout
[batch, seq, heads, dim]: block specs squeeze batch and heads and the kernel loads strided
[chunk, dim] tiles, so no transposes are needed around the call.

Why Triton and not Mosaic GPU: the kernels are written in the portable `pl` subset (refs, dots,
fori_loop) that also runs in interpret mode on CPU; Mosaic GPU needs its own warpgroup/TMA
programming model (plgpu), which these kernels do not use yet (docs/lasad.md §6).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lasadgen_jax.ops.lasad import pallas_chunk
from lasadgen_jax.ops.lasad.pallas_chunk import BlockSizes, ChunkLayout

# Column states of the 2d kernel live in registers: wp * d_block * dv_block floats per program.
STATE_FLOATS_2D = 16384
MAX_STATE_FLOATS_2D = 32768


def _kernel(decay_ref, q_ref, k_ref, v_ref, out_ref, *, layout: ChunkLayout, tangent, state_shape):
    """Walks the chunks of one (batch, head, tile) in order; the state is the loop carry."""
    log_row, log_col = decay_ref[0], decay_ref[1]
    t = layout.chunk_tokens
    step = pallas_chunk.step_of(layout)

    def chunk(index, carry):
        start = pl.multiple_of(index * t, t)
        values = pallas_chunk.load_chunk(layout, q_ref, k_ref, v_ref, start)
        out, carry = pallas_chunk.step_with_tangent(step, tangent, layout, values, carry, log_row, log_col)
        pallas_chunk.store_chunk(layout, out_ref, start, out)
        return carry

    state = jnp.zeros(state_shape, jnp.float32)
    jax.lax.fori_loop(0, layout.num_chunks, chunk, state if tangent is None else (state, state))


def _state_pass_kernel(decay_ref, k_ref, v_ref, states_ref, *, layout: ChunkLayout):
    """Pass 1 of the two-pass generic kernel: the state at the start of every chunk, in order."""
    log_row, log_col = decay_ref[0], decay_ref[1]
    t, d = layout.chunk_tokens, k_ref.shape[-1]

    def chunk(index, state):
        slots = pl.ds(pl.multiple_of(index * t, t), t)
        states_ref[pl.ds(pl.multiple_of(index * d, d), d), :] = state
        return pallas_chunk.generic_next_state(layout, k_ref[slots, :], v_ref[slots, :], state, log_row, log_col)

    jax.lax.fori_loop(0, layout.num_chunks, chunk, jnp.zeros((d, v_ref.shape[-1]), jnp.float32))


def _output_pass_kernel(decay_ref, q_ref, k_ref, v_ref, state_ref, out_ref, *, layout: ChunkLayout):
    """Pass 2: one chunk's outputs from its inputs and its starting state (chunks in parallel)."""
    log_row, log_col = decay_ref[0], decay_ref[1]
    chunk = (q_ref[...], k_ref[...], v_ref[...])
    out_ref[...] = pallas_chunk.generic_output(layout, chunk, state_ref[...], log_row, log_col).astype(out_ref.dtype)


def _two_pass(q, k, v, decays, *, layout, block, out_dtype, interpret, poison):
    batch, length, heads, d = q.shape
    dv = v.shape[-1]
    t, chunks = layout.chunk_tokens, layout.num_chunks
    params = pltriton.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages)
    decay_spec = pl.BlockSpec((None, 2), lambda *ids: (ids[1], 0))
    dv_block = min(block.dv_block, dv)
    states = pl.pallas_call(
        functools.partial(_state_pass_kernel, layout=layout),
        out_shape=jax.ShapeDtypeStruct((batch, heads, chunks * d, dv), jnp.float32),
        grid=(batch, heads, dv // dv_block),
        in_specs=[
            decay_spec,
            pl.BlockSpec((None, length, None, d), lambda b, h, j: (b, 0, h, 0)),
            pl.BlockSpec((None, length, None, dv_block), lambda b, h, j: (b, 0, h, j)),
        ],
        out_specs=pl.BlockSpec((None, None, chunks * d, dv_block), lambda b, h, j: (b, h, 0, j)),
        compiler_params=params,
        interpret=interpret,
        name=f"lasad_{layout.variant}_states",
    )(decays, k, v)
    out_block = min(64, dv)  # the whole value dim: the chunks already give the parallelism
    chunk_spec = lambda width: pl.BlockSpec((None, t, None, width), lambda b, h, c, j: (b, c, h, 0))
    value_spec = pl.BlockSpec((None, t, None, out_block), lambda b, h, c, j: (b, c, h, j))
    return call_with_poison(
        functools.partial(_output_pass_kernel, layout=layout), (decays, q, k, v, states),
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, dv), out_dtype),
        out_spec=value_spec,
        poison=poison,
        grid=(batch, heads, chunks, dv // out_block),
        in_specs=[decay_spec, chunk_spec(d), chunk_spec(d), value_spec,
                  pl.BlockSpec((None, None, d, out_block), lambda b, h, c, j: (b, h, c, j))],
        compiler_params=params,
        interpret=interpret,
        name=f"lasad_{layout.variant}_chunks",
    )


def tiles_2d(layout: ChunkLayout, block: BlockSizes, d: int, dv: int) -> tuple[int, int, int]:
    """(d_block, dv_block, num_warps) of the 2d kernel; raises if the column states cannot stay on chip."""
    dv_block = min(block.dv_block_2d, dv)
    d_block = block.d_block_2d
    if d_block == 0:  # the largest power of two whose states fit the budget, at least 16
        d_block = max(16, min(d, STATE_FLOATS_2D // (layout.row_slots * dv_block)))
        d_block = 1 << (d_block.bit_length() - 1)
    d_block = min(d_block, d)
    state_floats = layout.row_slots * d_block * dv_block
    if state_floats > MAX_STATE_FLOATS_2D:
        raise ValueError(
            f"2d kernel: column states of {layout.row_slots} slots x {d_block} x {dv_block} = {state_floats} "
            f"floats exceed the on-chip budget {MAX_STATE_FLOATS_2D}; use smaller d_block_2d/dv_block_2d"
        )
    num_warps = block.num_warps_2d or (4 if state_floats <= STATE_FLOATS_2D else 8)
    return d_block, dv_block, num_warps


def call_with_poison(kernel, inputs, *, out_shape, out_spec, poison: bool, **kwargs):
    """pallas_call; with poison=True the output buffer starts as NaN (aliased in), so an element
    the kernel fails to write shows up as NaN (the full-size GPU checks use this)."""
    in_specs = kwargs.pop("in_specs")
    if not poison:
        return pl.pallas_call(kernel, out_shape=out_shape, in_specs=in_specs, out_specs=out_spec, **kwargs)(*inputs)
    poisoned = jnp.full(out_shape.shape, jnp.nan, out_shape.dtype)
    skip_alias = lambda *refs: kernel(*refs[: len(inputs)], *refs[len(inputs) + 1 :])
    return pl.pallas_call(
        skip_alias, out_shape=out_shape, in_specs=[*in_specs, out_spec], out_specs=out_spec,
        input_output_aliases={len(inputs): 0}, **kwargs,
    )(*inputs, poisoned)


def cells(q, k, v, decays, *, layout: ChunkLayout, block: BlockSizes, tangent, out_dtype, interpret: bool,
          poison: bool = False):
    """The kernel on packed inputs: q, k [B, L, H, d], v [B, L, H, dv] with L = layout.padded_length,
    d and dv powers of two >= 16; decays [H, 2] float32 (log row, log col). Returns [B, L, H, dv]:
    the output, or with tangent 'row'/'col' its derivative along that log decay (float32 carries
    twice the state then)."""
    batch, length, heads, d = q.shape
    dv = v.shape[-1]
    decay_spec = pl.BlockSpec((None, 2), lambda *ids: (ids[1], 0))
    if layout.variant != "2d" and tangent is None and layout.num_chunks >= block.parallel_chunks:
        return _two_pass(q, k, v, decays, layout=layout, block=block, out_dtype=out_dtype, interpret=interpret,
                         poison=poison)
    if layout.variant != "2d":
        params = pltriton.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages)
        dv_block = min(block.dv_block, dv)
        spec = lambda width: pl.BlockSpec((None, length, None, width), lambda b, h, j: (b, 0, h, 0))
        value_spec = pl.BlockSpec((None, length, None, dv_block), lambda b, h, j: (b, 0, h, j))
        kernel = functools.partial(_kernel, layout=layout, tangent=tangent, state_shape=(d, dv_block))
        return call_with_poison(
            kernel, (decays, q, k, v),
            out_shape=jax.ShapeDtypeStruct((batch, length, heads, dv), out_dtype),
            out_spec=value_spec,
            poison=poison,
            grid=(batch, heads, dv // dv_block),
            in_specs=[decay_spec, spec(d), spec(d), value_spec],
            compiler_params=params,
            interpret=interpret,
            name=f"lasad_{layout.variant}{'_d_' + tangent if tangent else ''}",
        )

    d_block, dv_block, num_warps = tiles_2d(layout, block, d, dv)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=block.num_stages)
    key_tiles = d // d_block
    key_spec = pl.BlockSpec((None, length, None, d_block), lambda b, h, j, i: (b, 0, h, i))
    value_spec = pl.BlockSpec((None, length, None, dv_block), lambda b, h, j, i: (b, 0, h, j))
    partial_dtype = out_dtype if key_tiles == 1 else jnp.float32
    kernel = functools.partial(_kernel, layout=layout, tangent=tangent, state_shape=(layout.row_slots, d_block * dv_block))
    out = call_with_poison(
        kernel, (decays, q, k, v),
        out_shape=jax.ShapeDtypeStruct((key_tiles, batch, length, heads, dv), partial_dtype),
        out_spec=pl.BlockSpec((None, None, length, None, dv_block), lambda b, h, j, i: (i, b, 0, h, j)),
        poison=poison,
        grid=(batch, heads, dv // dv_block, key_tiles),
        in_specs=[decay_spec, key_spec, key_spec, value_spec],
        compiler_params=params,
        interpret=interpret,
        name=f"lasad_2d{'_d_' + tangent if tangent else ''}",
    )
    return out[0] if key_tiles == 1 else jnp.sum(out, axis=0).astype(out_dtype)
