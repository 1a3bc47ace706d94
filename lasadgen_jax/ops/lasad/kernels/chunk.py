"""The chunk kernel family behind `impl="pallas"`: layout, lowering choice and gradients (docs/lasad.md §6).

The bodies are in chunk_gpu.py (Triton), chunk_mgpu.py (Mosaic GPU, Hopper: the generic kernel's
forward and gradient step, `ChunkOptions.gpu_lowering`) and chunk_tpu.py (Mosaic TPU); all compute
the cell part of LASAD (no prefix) with the arithmetic of chunk_math.py. This module packs the
inputs into chunks, pads head dims to what the backend tiles (powers of two >= 16 on GPU, >= 64
for Mosaic GPU, multiples of 128 lanes on TPU), picks the GPU lowering, and wires the backward
pass with `jax.custom_vjp`. Tiles: `BlockSizes`; algorithm switches: `ChunkOptions` (chunk_config.py).

`1d`, `2d_row`, `none` (ChunkOptions.backward_generic="chunks", the default): the chunk backward,
`chunk_backward` below: every chunk's starting state and its adjoint (two sequential passes),
then every chunk's dq, dk, dv and share of the decay gradients in parallel (docs/lasad.md §6).

`2d` (and backward_generic="refwd"): re-running the forward kernel,

    dq = forward(q=do, k=v, v=k)
    dk = flip(forward(q=flip v,  k=flip do, v=flip q))
    dv = flip(forward(q=flip k,  k=flip q,  v=flip do))

(the recomputation of autodiff.py: `flip` turns the grid by 180 degrees), each a call of the same
forward kernel. The per-head log decays get their gradients from the kernel in tangent mode: it
carries, next to each state, the state's derivative along one log decay (a `jax.jvp` of the chunk
step inside the kernel) and writes o' = d out / d log_decay; then dL/dlog_decay = sum do . o'
(heads are independent, so one tangent of ones gives every head's derivative). One tangent call
per decay the variant uses: `1d` one, `2d` and `2d_row` two, `none` none. Nothing of size
O(N d dv) is stored.

`ChunkOptions(backward_2d="sweep")` (opt-in, GPU only) replaces this for `2d` by two calls: dq from
the forward kernel and dk, dv and the decay gradients from one reverse row sweep (sweep_2d.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lasadgen_jax.ops.lasad import common
from lasadgen_jax.ops.lasad.chunk_math import ChunkLayout
from lasadgen_jax.ops.lasad.kernels import backend as kernel_backend
from lasadgen_jax.ops.lasad.kernels import chunk_gpu, chunk_mgpu, chunk_tpu, sweep_2d
from lasadgen_jax.ops.lasad.kernels.chunk_config import BlockSizes, ChunkOptions

__all__ = ["BlockSizes", "ChunkOptions", "chunk_backward", "chunk_cells", "run_kernel", "uses_mosaic_gpu"]


def mosaic_gpu_refusal(q, v, *, grid, variant, tiles: BlockSizes, options: ChunkOptions, interpret, poison,
                       tangent=None) -> str:
    """Why the Mosaic GPU kernels (chunk_mgpu.py) cannot take this call ('' if they can)."""
    reason = chunk_mgpu.unsupported(grid, variant, q.dtype, q.shape[-1], v.shape[-1])
    if not reason and tiles.block_tokens != chunk_mgpu.CHUNK:
        reason = f"the Mosaic GPU kernels use {chunk_mgpu.CHUNK}-slot chunks, got block_tokens={tiles.block_tokens}"
    if not reason and options.backward_generic != "chunks":
        reason = "the Mosaic GPU kernels have the chunk backward only (backward_generic='chunks')"
    if not reason and interpret:
        reason = "the Mosaic GPU kernels have no interpret mode here (chunk_mgpu.py says why)"
    if not reason and poison:
        reason = "poison is implemented for the Triton kernels only"
    if not reason and tangent is not None:
        reason = "the Mosaic GPU kernels have no tangent mode"
    return reason


def uses_mosaic_gpu(backend: str, tiles: BlockSizes, options: ChunkOptions, q, v, **call) -> bool:
    """Whether this GPU call runs the Mosaic GPU kernels (ChunkOptions.gpu_lowering): always for
    "mosaic" (raising if they cannot take it), never for "triton"; for "auto" on a Hopper GPU
    when they can take it."""
    if backend != "gpu" or options.gpu_lowering == "triton":
        return False
    reason = mosaic_gpu_refusal(q, v, tiles=tiles, options=options, **call)
    if options.gpu_lowering == "mosaic" and reason:
        raise ValueError(f"ChunkOptions(gpu_lowering='mosaic'): {reason}")
    return options.gpu_lowering == "mosaic" or (not reason and kernel_backend.is_hopper())


def _pack(layout: ChunkLayout, pad, q, k, *values):
    """[B, N, H, e] arrays packed into the layout's chunks: q, k with head dims zero-padded to
    pad(d), the value-sized arrays (v, and d_out in a backward) to pad(dv)."""
    d_pad, dv_pad = pad(q.shape[-1]), pad(values[0].shape[-1])
    return ([kernel_backend.pad_last(layout.pack(x), d_pad) for x in (q, k)]
            + [kernel_backend.pad_last(layout.pack(x), dv_pad) for x in values])


def _backend_padding(backend: str):
    return functools.partial(kernel_backend.padded_dim, backend)


def _layout(grid, variant: str, tiles: BlockSizes) -> ChunkLayout:
    return ChunkLayout.make(grid, variant, tiles.block_tokens, tiles.block_tokens_2d)


def _to_heads_major(x):
    """[B, L, H, e] <-> [B, H, L, e]: the TPU bodies' layout, every block a (chunk, 128 * k) tile."""
    return x.transpose(0, 2, 1, 3)


def run_kernel(q, k, v, log_decay_row, log_decay_col, *, grid, variant, backend, interpret, tiles: BlockSizes,
               options: ChunkOptions, tangent, out_dtype, poison=False):
    """The forward kernel on [B, N, H, *] inputs: [B, N, H, dv] in out_dtype (no prefix); with
    tangent 'row' or 'col' the output's derivative along that log decay.

    poison=True (GPU only; for checks) starts the kernel's output buffer as NaN."""
    kernel_backend.check_backend(backend)
    if uses_mosaic_gpu(backend, tiles, options, q, v, grid=grid, variant=variant, interpret=interpret, poison=poison,
                       tangent=tangent):
        out = chunk_mgpu.forward(q, k, v, log_decay_row, log_decay_col, grid=grid, variant=variant, tiles=tiles,
                                 options=options)
        return out.astype(out_dtype)
    layout = _layout(grid, variant, tiles)
    packed = _pack(layout, _backend_padding(backend), q, k, v)
    decays = kernel_backend.stack_decays(log_decay_row, log_decay_col)
    kwargs = dict(layout=layout, tiles=tiles, tangent=tangent, out_dtype=out_dtype, interpret=interpret)
    if backend == "gpu":
        out = chunk_gpu.cells(*packed, decays, **kwargs, parallel_chunks=options.parallel_chunks, poison=poison)
    elif poison:
        raise ValueError("poison is implemented for the GPU kernels only")
    else:
        out = _to_heads_major(chunk_tpu.cells(*map(_to_heads_major, packed), decays, **kwargs))
    return layout.unpack(out)[..., :v.shape[-1]]


def chunk_backward(q, k, v, log_decay_row, log_decay_col, d_out, *, grid, variant, backend, interpret,
                   tiles: BlockSizes, options: ChunkOptions, poison=False):
    """The generic variants' gradients by the chunk backward (ChunkOptions.backward_generic="chunks"):
    (dq, dk, dv) in q.dtype and (d log_decay_row, d log_decay_col) float32. d_out: the cotangent of
    the cell output, [B, N, H, dv]. poison=True (GPU only; for checks) starts every output as NaN."""
    layout = _layout(grid, variant, tiles)
    mosaic = uses_mosaic_gpu(backend, tiles, options, q, v, grid=grid, variant=variant, interpret=interpret,
                             poison=poison)
    d_out_in = d_out.astype(q.dtype)  # the op returns q.dtype: d_out holds no more precision
    padding = chunk_mgpu.mosaic_padded_dim if mosaic else _backend_padding(backend)
    packed = _pack(layout, padding, q, k, v, d_out_in)
    decays = kernel_backend.stack_decays(log_decay_row, log_decay_col)
    kwargs = dict(layout=layout, tiles=tiles, interpret=interpret)
    if mosaic:
        states = chunk_gpu.states_and_adjoints(*packed, decays, **kwargs)
        dq, dk, d_v, d_row, d_col = chunk_mgpu.chunk_gradients(*packed, states, log_decay_row, log_decay_col,
                                                               layout=layout)
        d_decays = jnp.stack([d_row, d_col], axis=1)
    elif backend == "gpu":
        dq, dk, d_v, d_decays = chunk_gpu.chunk_gradients(*packed, decays, **kwargs, poison=poison)
    elif poison:
        raise ValueError("poison is implemented for the GPU kernels only")
    else:
        dq, dk, d_v, d_decays = chunk_tpu.chunk_gradients(*map(_to_heads_major, packed), decays, **kwargs)
        dq, dk, d_v = map(_to_heads_major, (dq, dk, d_v))
    d, dv = q.shape[-1], v.shape[-1]
    unpack = lambda x, size: layout.unpack(x)[..., :size]
    return unpack(dq, d), unpack(dk, d), unpack(d_v, dv), d_decays[:, 0], d_decays[:, 1]


def sweep_backward(q, k, v, log_decay_row, log_decay_col, d_out, *, grid, interpret, tiles: BlockSizes,
                   options: ChunkOptions):
    """The `2d` gradients by the sweep (sweep_2d.py; GPU kernels): (dq, dk, dv, d log_decay_row,
    d log_decay_col), float32. d_out: the cotangent of the cell output, [B, N, H, dv]."""
    layout = _layout(grid, "2d", tiles)
    d_out_in = d_out.astype(q.dtype)  # the op returns q.dtype: d_out holds no more precision
    dq = run_kernel(d_out_in, v, k, log_decay_row, log_decay_col, grid=grid, variant="2d", backend="gpu",
                    interpret=interpret, tiles=tiles, options=options, tangent=None, out_dtype=jnp.float32)
    packed = _pack(layout, _backend_padding("gpu"), q, k, v, d_out_in)
    decays = kernel_backend.stack_decays(log_decay_row, log_decay_col)
    dk, dk_col, d_v = sweep_2d.key_gradients(*packed, decays, layout=layout, tiles=tiles, interpret=interpret)
    d, dv = q.shape[-1], v.shape[-1]
    dk, dk_col, d_v = layout.unpack(dk)[..., :d], layout.unpack(dk_col)[..., :d], layout.unpack(d_v)[..., :dv]
    # dL/dlog g_row = sum over pairs (r_a - r_m) P(a, m) = sum_a r_a (q_a . dq_a) - sum_m r_m (k_m . dk_m):
    # both sums total sum P, so rows are centred on the grid's middle to halve what cancels.
    h, w = grid
    rows = (jnp.arange(h * w) // w).astype(jnp.float32) - (h - 1) / 2
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    d_row = (jnp.einsum("n,bnhd,bnhd->h", rows, q32, dq, precision=jax.lax.Precision.HIGHEST)
             - jnp.einsum("n,bnhd,bnhd->h", rows, k32, dk, precision=jax.lax.Precision.HIGHEST))
    d_col = jnp.einsum("bnhd,bnhd->h", k32, dk_col, precision=jax.lax.Precision.HIGHEST)
    return dq, dk, d_v, d_row, d_col


def _rerun_backward(kernel, variant, residuals, d_out):
    """The gradients by re-running the forward kernel on flipped inputs, plus one tangent call per
    decay the variant uses (the module docstring)."""
    q, k, v, log_decay_row, log_decay_col = residuals
    run = functools.partial(kernel, log_decay_row=log_decay_row, log_decay_col=log_decay_col, out_dtype=jnp.float32)
    d_out_in = d_out.astype(q.dtype)  # the op returns q.dtype: d_out holds no more precision
    flip = lambda x: x[:, ::-1]
    dq = run(d_out_in, v, k, tangent=None)
    dk = flip(run(flip(v), flip(d_out_in), flip(q), tangent=None))
    dv = flip(run(flip(k), flip(q), flip(d_out_in), tangent=None))
    d_decays = []
    for which, used, log_decay in zip(("row", "col"), common.USES_DECAY[variant], (log_decay_row, log_decay_col)):
        if used:
            out_dot = run(q, k, v, tangent=which)
            d_decays.append(jnp.einsum("bnhe,bnhe->h", d_out.astype(jnp.float32), out_dot).astype(log_decay.dtype))
        else:
            d_decays.append(jnp.zeros_like(log_decay))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *d_decays


@functools.lru_cache(maxsize=None)
def chunk_cells(backend: str, interpret: bool, tiles: BlockSizes, options: ChunkOptions):
    """cells(q, k, v, log_decay_row, log_decay_col, grid, variant) -> [B, N, H, dv] in q.dtype,
    with the custom_vjp described in the module docstring. grid and variant are static."""
    kernel_backend.check_backend(backend)
    if options.backward_2d == "sweep" and backend != "gpu":
        raise ValueError(
            f"ChunkOptions(backward_2d='sweep') has a GPU (Triton) kernel only, not one for backend {backend!r}; "
            "use backward_2d='refwd'"
        )
    kernel = functools.partial(run_kernel, backend=backend, interpret=interpret, tiles=tiles, options=options)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def cells(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return kernel(q, k, v, log_decay_row, log_decay_col, grid=grid, variant=variant, tangent=None,
                      out_dtype=q.dtype)

    def forward(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return cells(q, k, v, log_decay_row, log_decay_col, grid, variant), (q, k, v, log_decay_row, log_decay_col)

    def backward(grid, variant, residuals, d_out):
        q, k, v, log_decay_row, log_decay_col = residuals
        if variant == "2d" and options.backward_2d == "sweep":
            dq, dk, dv, d_row, d_col = sweep_backward(
                q, k, v, log_decay_row, log_decay_col, d_out, grid=grid, interpret=interpret, tiles=tiles,
                options=options,
            )
            return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
                    d_row.astype(log_decay_row.dtype), d_col.astype(log_decay_col.dtype))
        if variant != "2d" and options.backward_generic == "chunks":
            dq, dk, dv, d_row, d_col = chunk_backward(
                q, k, v, log_decay_row, log_decay_col, d_out, grid=grid, variant=variant, backend=backend,
                interpret=interpret, tiles=tiles, options=options,
            )
            return dq, dk, dv, d_row.astype(log_decay_row.dtype), d_col.astype(log_decay_col.dtype)
        return _rerun_backward(functools.partial(kernel, grid=grid, variant=variant), variant, residuals, d_out)

    cells.defvjp(forward, backward)
    return cells
