"""Triton bodies of the chunk kernel family (`jax.experimental.pallas.triton`).

One program per (batch, head, value tile) walks its chunks in order inside the kernel, the state
carried by the loop (registers), so no state ever goes to HBM. For long sequences the generic
kernel instead runs two passes (`_two_pass`): chunk starting states (d x dv per chunk, in HBM),
then every chunk in parallel. The generic kernel's backward (`chunk_gradients`) runs the state
pass and the reverse adjoint pass in one launch, then every chunk's gradients in parallel.
Inputs stay in the op's layout [batch, seq, heads, dim]: block specs squeeze batch and heads and
the kernel loads strided [chunk, dim] tiles, so no transposes are needed around the call.

These bodies are written in the portable `pl` subset (refs, dots, fori_loop), so they also run in
interpret mode on CPU (how the tests check them). On a Hopper GPU the generic kernel's forward and
gradient step run as the Mosaic GPU bodies of chunk_mgpu.py instead (`ChunkOptions.gpu_lowering`),
which reuse the two sequential passes below; the `2d` kernel and its sweep are Triton only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lasadgen_jax.ops.lasad import chunk_math
from lasadgen_jax.ops.lasad.chunk_math import ChunkLayout
from lasadgen_jax.ops.lasad.kernels import chunk_refs
from lasadgen_jax.ops.lasad.kernels.backend import call_with_poison
from lasadgen_jax.ops.lasad.kernels.chunk_config import BlockSizes

# Column states of the 2d kernel live in registers: wp * d_block * dv_block floats per program, this many
# at the default tiles, at most the second (RESULTS.md, "The chunked kernels (`impl="pallas"`)": what bounds them).
STATE_FLOATS_2D = 16384
MAX_STATE_FLOATS_2D = 32768


def _kernel(decay_ref, q_ref, k_ref, v_ref, out_ref, *, layout: ChunkLayout, tangent, state_shape):
    """Walks the chunks of one (batch, head, tile) in order; the state is the loop carry."""
    log_row, log_col = decay_ref[0], decay_ref[1]
    t = layout.chunk_tokens
    step = chunk_math.step_of(layout)

    def chunk(index, carry):
        start = pl.multiple_of(index * t, t)
        values = chunk_refs.load_chunk(layout, q_ref, k_ref, v_ref, start)
        out, carry = chunk_math.step_with_tangent(step, tangent, layout, values, carry, log_row, log_col)
        chunk_refs.store_chunk(layout, out_ref, start, out)
        return carry

    state = jnp.zeros(state_shape, jnp.float32)
    jax.lax.fori_loop(0, layout.num_chunks, chunk, state if tangent is None else (state, state))


def _state_pass_kernel(decay_ref, k_ref, v_ref, states_ref, *, layout: ChunkLayout):
    """Pass 1 of the two-pass generic kernel: the state at the start of every chunk, in order."""
    log_row, log_col = decay_ref[0], decay_ref[1]
    t, d = layout.chunk_tokens, k_ref.shape[-1]

    def chunk(index, state):
        slots = pl.ds(pl.multiple_of(index * t, t), t)
        states_ref[pl.ds(pl.multiple_of(index * d, d), d), :] = state.astype(states_ref.dtype)
        return chunk_math.generic_next_state(layout, k_ref[slots, :], v_ref[slots, :], state, log_row, log_col)

    jax.lax.fori_loop(0, layout.num_chunks, chunk, jnp.zeros((d, v_ref.shape[-1]), jnp.float32))


def _output_pass_kernel(decay_ref, q_ref, k_ref, v_ref, state_ref, out_ref, *, layout: ChunkLayout):
    """Pass 2: one chunk's outputs from its inputs and its starting state (chunks in parallel)."""
    log_row, log_col = decay_ref[0], decay_ref[1]
    chunk = (q_ref[...], k_ref[...], v_ref[...])
    out_ref[...] = chunk_math.generic_output(layout, chunk, state_ref[...], log_row, log_col).astype(out_ref.dtype)


def _adjoint_pass_kernel(decay_ref, q_ref, d_out_ref, adjoints_ref, *, layout: ChunkLayout):
    """The chunk backward's reverse pass: dL/d(state at the start of chunk c + 1) for every chunk c,
    walking the chunks from the last (chunk_math.generic_previous_adjoint)."""
    log_row, log_col = decay_ref[0], decay_ref[1]
    t, d, last = layout.chunk_tokens, q_ref.shape[-1], layout.num_chunks - 1

    def chunk(step, adjoint):
        index = last - step
        slots = pl.ds(pl.multiple_of(index * t, t), t)
        adjoints_ref[pl.ds(pl.multiple_of(index * d, d), d), :] = adjoint.astype(adjoints_ref.dtype)
        return chunk_math.generic_previous_adjoint(layout, q_ref[slots, :], d_out_ref[slots, :], adjoint, log_row,
                                                     log_col)

    jax.lax.fori_loop(0, layout.num_chunks, chunk, jnp.zeros((d, d_out_ref.shape[-1]), jnp.float32))


def _both_passes_kernel(decay_ref, k_ref, v_ref, q_ref, d_out_ref, out_ref, *, layout: ChunkLayout):
    """The states (program axis 0 = 0) or the adjoints (= 1): the two sequential passes of the chunk
    backward in one launch, so that they run side by side."""
    which = pl.program_id(0)

    @pl.when(which == 0)
    def _():
        _state_pass_kernel(decay_ref, k_ref, v_ref, out_ref, layout=layout)

    @pl.when(which == 1)
    def _():
        _adjoint_pass_kernel(decay_ref, q_ref, d_out_ref, out_ref, layout=layout)


def chunk_states(k, v, decays, *, layout, tiles: BlockSizes, interpret):
    """Every chunk's starting state, [B, H, C * d, dv] (chunk c in rows c*d ... c*d + d), carried in
    float32 and stored in the inputs' dtype: the output pass only uses it as a matmul input."""
    batch, length, heads, d = k.shape
    dv = v.shape[-1]
    dv_block = min(tiles.dv_block, dv)
    return pl.pallas_call(
        functools.partial(_state_pass_kernel, layout=layout),
        out_shape=jax.ShapeDtypeStruct((batch, heads, layout.num_chunks * d, dv), k.dtype),
        grid=(batch, heads, dv // dv_block),
        in_specs=[
            pl.BlockSpec((None, 2), lambda b, h, j: (h, 0)),
            pl.BlockSpec((None, length, None, d), lambda b, h, j: (b, 0, h, 0)),
            pl.BlockSpec((None, length, None, dv_block), lambda b, h, j: (b, 0, h, j)),
        ],
        out_specs=pl.BlockSpec((None, None, layout.num_chunks * d, dv_block), lambda b, h, j: (b, h, 0, j)),
        compiler_params=pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=f"lasad_{layout.variant}_states",
    )(decays, k, v)


def states_and_adjoints(q, k, v, d_out, decays, *, layout, tiles: BlockSizes, interpret):
    """[2, B, H, C * d, dv]: every chunk's starting state ([0]) and dL/d(state at the start of the
    next chunk) ([1]), from one launch of both sequential passes; carried in float32, stored in the
    inputs' dtype (the gradient kernel uses them as matmul inputs)."""
    batch, length, heads, d = k.shape
    dv = v.shape[-1]
    dv_block = min(tiles.dv_block, dv)
    key_spec = pl.BlockSpec((None, length, None, d), lambda i, b, h, j: (b, 0, h, 0))
    value_spec = pl.BlockSpec((None, length, None, dv_block), lambda i, b, h, j: (b, 0, h, j))
    return pl.pallas_call(
        functools.partial(_both_passes_kernel, layout=layout),
        out_shape=jax.ShapeDtypeStruct((2, batch, heads, layout.num_chunks * d, dv), k.dtype),
        grid=(2, batch, heads, dv // dv_block),
        in_specs=[pl.BlockSpec((None, 2), lambda i, b, h, j: (h, 0)), key_spec, value_spec, key_spec, value_spec],
        out_specs=pl.BlockSpec((None, None, None, layout.num_chunks * d, dv_block), lambda i, b, h, j: (i, b, h, 0, j)),
        compiler_params=pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=f"lasad_{layout.variant}_states_adjoints",
    )(decays, k, v, q, d_out)


def _two_pass(q, k, v, decays, *, layout, tiles: BlockSizes, out_dtype, interpret, poison):
    batch, length, heads, d = q.shape
    dv = v.shape[-1]
    t, chunks = layout.chunk_tokens, layout.num_chunks
    states = chunk_states(k, v, decays, layout=layout, tiles=tiles, interpret=interpret)
    out_block = min(64, dv)  # the whole value dim: the chunks already give the parallelism
    chunk_spec = lambda width: pl.BlockSpec((None, t, None, width), lambda b, h, c, j: (b, c, h, 0))
    value_spec = pl.BlockSpec((None, t, None, out_block), lambda b, h, c, j: (b, c, h, j))
    return call_with_poison(
        functools.partial(_output_pass_kernel, layout=layout), (decays, q, k, v, states),
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, dv), out_dtype),
        out_spec=value_spec,
        poison=poison,
        grid=(batch, heads, chunks, dv // out_block),
        in_specs=[pl.BlockSpec((None, 2), lambda b, h, c, j: (h, 0)), chunk_spec(d), chunk_spec(d), value_spec,
                  pl.BlockSpec((None, None, d, out_block), lambda b, h, c, j: (b, h, c, j))],
        compiler_params=pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=f"lasad_{layout.variant}_chunks",
    )


def _gradient_kernel(decay_ref, q_ref, k_ref, v_ref, d_out_ref, state_ref, adjoint_ref,
                     dq_ref, dk_ref, dv_ref, d_decay_ref, *, layout: ChunkLayout, sub_block: int):
    """One chunk's gradients from its inputs, starting state and adjoint (chunks in parallel),
    formed per sub-block of `sub_block` slots."""
    log_row, log_col = decay_ref[0], decay_ref[1]
    blocks = [pl.ds(i * sub_block, sub_block) for i in range(layout.chunk_tokens // sub_block)]
    chunk = tuple([ref[block, :] for block in blocks] for ref in (q_ref, k_ref, v_ref, d_out_ref))
    dq, dk, dv, d_row, d_col = chunk_math.generic_gradients(
        layout, chunk, state_ref[...], adjoint_ref[...], log_row, log_col)
    for block, dq_block, dk_block, dv_block in zip(blocks, dq, dk, dv):
        dq_ref[block, :] = dq_block.astype(dq_ref.dtype)
        dk_ref[block, :] = dk_block.astype(dk_ref.dtype)
        dv_ref[block, :] = dv_block.astype(dv_ref.dtype)
    d_decay_ref[...] = chunk_math.pair_vector(d_row, d_col, d_decay_ref.shape)


def chunk_gradients(q, k, v, d_out, decays, *, layout, tiles: BlockSizes, interpret, poison=False):
    """The generic kernel's backward (`1d`, `none`, `2d_row`) on packed inputs q, k [B, L, H, d],
    v, d_out [B, L, H, dv]: a forward pass for the chunk states, a reverse pass for their adjoints
    (the two in one launch), then every chunk's gradients in parallel. Returns (dq, dk, dv) in
    q.dtype and the log-decay gradients [H, 2] float32 (row, column). Of size N x d x dv nothing
    goes to HBM beyond one d x dv matrix per chunk and pass."""
    batch, length, heads, d = q.shape
    dv = v.shape[-1]
    t, chunks = layout.chunk_tokens, layout.num_chunks
    states, adjoints = states_and_adjoints(q, k, v, d_out, decays, layout=layout, tiles=tiles, interpret=interpret)
    num_warps = tiles.num_warps_gradients or tiles.num_warps
    chunk_spec = lambda width: pl.BlockSpec((None, t, None, width), lambda b, h, c: (b, c, h, 0))
    matrix_spec = pl.BlockSpec((None, None, d, dv), lambda b, h, c: (b, h, c, 0))
    shapes = [jax.ShapeDtypeStruct(x.shape, q.dtype) for x in (q, k, v)]
    shapes.append(jax.ShapeDtypeStruct((batch, heads, chunks, 2), jnp.float32))
    decay_share_spec = pl.BlockSpec((None, None, None, 2), lambda b, h, c: (b, h, c, 0))
    specs = [chunk_spec(d), chunk_spec(d), chunk_spec(dv), decay_share_spec]
    dq, dk, d_v, d_decays = call_with_poison(
        functools.partial(_gradient_kernel, layout=layout, sub_block=min(t, tiles.gradient_block)),
        (decays, q, k, v, d_out, states, adjoints),
        out_shape=shapes,
        out_spec=specs,
        poison=poison,
        grid=(batch, heads, chunks),
        in_specs=[pl.BlockSpec((None, 2), lambda b, h, c: (h, 0)), chunk_spec(d), chunk_spec(d), chunk_spec(dv),
                  chunk_spec(dv), matrix_spec, matrix_spec],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=f"lasad_{layout.variant}_gradients",
    )
    return dq, dk, d_v, jnp.sum(d_decays, axis=(0, 2))


def tiles_2d(layout: ChunkLayout, tiles: BlockSizes, d: int, dv: int) -> tuple[int, int, int]:
    """(d_block, dv_block, num_warps) of the 2d kernel; raises if the column states cannot stay on chip."""
    dv_block = min(tiles.dv_block_2d, dv)
    d_block = tiles.d_block_2d
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
    num_warps = tiles.num_warps_2d or (4 if state_floats <= STATE_FLOATS_2D else 8)
    return d_block, dv_block, num_warps


def cells(q, k, v, decays, *, layout: ChunkLayout, tiles: BlockSizes, tangent, out_dtype, interpret: bool,
          parallel_chunks: int, poison: bool = False):
    """The kernel on packed inputs: q, k [B, L, H, d], v [B, L, H, dv] with L = layout.padded_length,
    d and dv powers of two >= 16; decays [H, 2] float32 (log row, log col). Returns [B, L, H, dv]:
    the output, or with tangent 'row'/'col' its derivative along that log decay (float32 carries
    twice the state then)."""
    batch, length, heads, d = q.shape
    dv = v.shape[-1]
    decay_spec = pl.BlockSpec((None, 2), lambda *ids: (ids[1], 0))
    if layout.variant != "2d" and tangent is None and layout.num_chunks >= parallel_chunks:
        return _two_pass(q, k, v, decays, layout=layout, tiles=tiles, out_dtype=out_dtype, interpret=interpret,
                         poison=poison)
    if layout.variant != "2d":
        params = pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        dv_block = min(tiles.dv_block, dv)
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

    d_block, dv_block, num_warps = tiles_2d(layout, tiles, d, dv)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=tiles.num_stages_2d)
    key_tiles = d // d_block
    key_spec = pl.BlockSpec((None, length, None, d_block), lambda b, h, j, i: (b, 0, h, i))
    value_spec = pl.BlockSpec((None, length, None, dv_block), lambda b, h, j, i: (b, 0, h, j))
    partial_dtype = out_dtype if key_tiles == 1 else jnp.float32
    state_shape = (layout.row_slots, d_block * dv_block)
    kernel = functools.partial(_kernel, layout=layout, tangent=tangent, state_shape=state_shape)
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
