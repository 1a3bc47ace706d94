"""The Pallas kernels behind `impl="pallas"`: layout, backend choice and gradients (docs/lasad.md §6).

The kernels themselves are in pallas_gpu.py (Triton), pallas_mgpu.py (Mosaic GPU, Hopper: the
generic kernel's forward and gradient step, `BlockSizes.gpu_lowering`) and pallas_tpu.py (Mosaic
TPU); all compute the cell part of LASAD (no prefix) with the arithmetic of pallas_chunk.py. This
module packs the inputs into chunks, pads head dims to what the backend tiles (powers of two >= 16
on GPU, >= 64 for Mosaic GPU, multiples of 128 lanes on TPU), picks the GPU lowering, and wires
the backward pass with `jax.custom_vjp`.

`1d`, `2d_row`, `none` (BlockSizes.backward_generic="chunks", the default): the chunk backward,
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

`BlockSizes(backward_2d="sweep")` (opt-in, GPU only) replaces this for `2d` by two calls: dq from
the forward kernel and dk, dv and the decay gradients from one reverse row sweep (pallas_sweep.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lasadgen_jax.ops.lasad import common, pallas_gpu, pallas_mgpu, pallas_sweep, pallas_tpu
from lasadgen_jax.ops.lasad.pallas_chunk import BlockSizes, ChunkLayout, next_power_of_two

BACKENDS = ("gpu", "tpu")
PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def backend_name(platform: str) -> str:
    """'cpu', 'gpu' or 'tpu' for a jax platform name; raises for any other platform."""
    if platform not in PLATFORMS:
        raise ValueError(f"LASAD knows the platforms {sorted(PLATFORMS)}, got {platform!r}; pass impl explicitly")
    return PLATFORMS[platform]


def default_backend() -> str:
    """The kernel backend of jax's default device; raises on CPU (no silent fallback)."""
    platform = jax.default_backend()
    if platform in PLATFORMS and backend_name(platform) in BACKENDS:
        return backend_name(platform)
    raise ValueError(
        f"impl='pallas' needs a GPU or TPU, but jax's default backend is {platform!r}; use "
        "impl='chunked' (or 'auto'), or lasad_attention_pallas(..., backend=..., interpret=True) to "
        "run the kernels in interpret mode"
    )


def _pad_last(x, size: int):
    return x if x.shape[-1] == size else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, size - x.shape[-1]),))


def padded_dim(backend: str, size: int) -> int:
    """A head dim padded to what the backend's kernels tile: a power of two >= 16 on GPU, a
    multiple of 128 lanes on TPU."""
    if backend == "gpu":
        return next_power_of_two(max(16, size))
    return -(-size // pallas_tpu.LANES) * pallas_tpu.LANES


def is_hopper() -> bool:
    """Whether jax's first GPU is an NVIDIA Hopper (compute capability 9.x); False without one."""
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:  # no GPU backend (e.g. exporting for CUDA on a CPU)
        return False
    return str(getattr(device, "compute_capability", "")).startswith("9.")


def mosaic_gpu_refusal(q, v, *, grid, variant, block, interpret, poison, tangent=None) -> str:
    """Why the Mosaic GPU kernels (pallas_mgpu.py) cannot take this call ('' if they can)."""
    reason = pallas_mgpu.unsupported(grid, variant, q.dtype, q.shape[-1], v.shape[-1])
    if not reason and block.block_tokens != pallas_mgpu.CHUNK:
        reason = f"the Mosaic GPU kernels use {pallas_mgpu.CHUNK}-slot chunks, got block_tokens={block.block_tokens}"
    if not reason and block.backward_generic != "chunks":
        reason = "the Mosaic GPU kernels have the chunk backward only (backward_generic='chunks')"
    if not reason and interpret:
        reason = "the Mosaic GPU kernels have no interpret mode here (pallas_mgpu.py says why)"
    if not reason and poison:
        reason = "poison is implemented for the Triton kernels only"
    if not reason and tangent is not None:
        reason = "the Mosaic GPU kernels have no tangent mode"
    return reason


def uses_mosaic_gpu(backend: str, block: BlockSizes, q, v, **call) -> bool:
    """Whether this GPU call runs the Mosaic GPU kernels (BlockSizes.gpu_lowering): always for
    "mosaic" (raising if they cannot take it), never for "triton"; for "auto" on a Hopper GPU
    when they can take it."""
    if backend != "gpu" or block.gpu_lowering == "triton":
        return False
    reason = mosaic_gpu_refusal(q, v, block=block, **call)
    if block.gpu_lowering == "mosaic" and reason:
        raise ValueError(f"BlockSizes(gpu_lowering='mosaic'): {reason}")
    return block.gpu_lowering == "mosaic" or (not reason and is_hopper())


def run_kernel(q, k, v, log_decay_row, log_decay_col, *, grid, variant, backend, interpret, block, tangent, out_dtype,
               poison=False):
    """The forward kernel on [B, N, H, *] inputs: [B, N, H, dv] in out_dtype (no prefix); with
    tangent 'row' or 'col' the output's derivative along that log decay.

    poison=True (GPU only; for checks) starts the kernel's output buffer as NaN."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if uses_mosaic_gpu(backend, block, q, v, grid=grid, variant=variant, interpret=interpret, poison=poison,
                       tangent=tangent):
        out = pallas_mgpu.forward(q, k, v, log_decay_row, log_decay_col, grid=grid, variant=variant, block=block)
        return out.astype(out_dtype)
    layout = ChunkLayout.make(grid, variant, block.block_tokens, block.block_tokens_2d)
    decays = jnp.stack([log_decay_row, log_decay_col], axis=1).astype(jnp.float32)  # [H, 2]
    d, dv = q.shape[-1], v.shape[-1]
    d_pad, dv_pad = padded_dim(backend, d), padded_dim(backend, dv)
    packed = [
        _pad_last(layout.pack(x), size) for x, size in ((q, d_pad), (k, d_pad), (v, dv_pad))
    ]
    kwargs = dict(layout=layout, block=block, tangent=tangent, out_dtype=out_dtype, interpret=interpret)
    if backend == "gpu":
        out = pallas_gpu.cells(*packed, decays, **kwargs, poison=poison)
    elif poison:
        raise ValueError("poison is implemented for the GPU kernels only")
    else:  # [B, L, H, e] -> [B, H, L, e]: every block a (chunk, 128 * k) tile
        to_heads_major = lambda x: x.transpose(0, 2, 1, 3)
        out = to_heads_major(pallas_tpu.cells(*map(to_heads_major, packed), decays, **kwargs))
    return layout.unpack(out)[..., :dv]


def chunk_backward(q, k, v, log_decay_row, log_decay_col, d_out, *, grid, variant, backend, interpret, block,
                   poison=False):
    """The generic variants' gradients by the chunk backward (BlockSizes.backward_generic="chunks"):
    (dq, dk, dv) in q.dtype and (d log_decay_row, d log_decay_col) float32. d_out: the cotangent of
    the cell output, [B, N, H, dv]. poison=True (GPU only; for checks) starts every output as NaN."""
    layout = ChunkLayout.make(grid, variant, block.block_tokens, block.block_tokens_2d)
    decays = jnp.stack([log_decay_row, log_decay_col], axis=1).astype(jnp.float32)  # [H, 2]
    d, dv = q.shape[-1], v.shape[-1]
    d_pad, dv_pad = padded_dim(backend, d), padded_dim(backend, dv)
    mosaic = uses_mosaic_gpu(backend, block, q, v, grid=grid, variant=variant, interpret=interpret, poison=poison)
    if mosaic:
        d_pad, dv_pad = pallas_mgpu.padded_dim(d), pallas_mgpu.padded_dim(dv)
    d_out_in = d_out.astype(q.dtype)  # the op returns q.dtype: d_out holds no more precision
    packed = [_pad_last(layout.pack(x), size) for x, size in ((q, d_pad), (k, d_pad), (v, dv_pad), (d_out_in, dv_pad))]
    kwargs = dict(layout=layout, block=block, interpret=interpret)
    if mosaic:
        states = pallas_gpu.states_and_adjoints(*packed, decays, **kwargs)
        dq, dk, d_v, d_row, d_col = pallas_mgpu.chunk_gradients(*packed, states, log_decay_row, log_decay_col,
                                                                layout=layout)
        d_decays = jnp.stack([d_row, d_col], axis=1)
    elif backend == "gpu":
        dq, dk, d_v, d_decays = pallas_gpu.chunk_gradients(*packed, decays, **kwargs, poison=poison)
    elif poison:
        raise ValueError("poison is implemented for the GPU kernels only")
    else:
        to_heads_major = lambda x: x.transpose(0, 2, 1, 3)
        dq, dk, d_v, d_decays = pallas_tpu.chunk_gradients(*map(to_heads_major, packed), decays, **kwargs)
        dq, dk, d_v = map(to_heads_major, (dq, dk, d_v))
    unpack = lambda x, size: layout.unpack(x)[..., :size]
    return unpack(dq, d), unpack(dk, d), unpack(d_v, dv), d_decays[:, 0], d_decays[:, 1]


def sweep_backward(q, k, v, log_decay_row, log_decay_col, d_out, *, grid, interpret, block):
    """The `2d` gradients by the sweep (pallas_sweep.py; GPU kernels): (dq, dk, dv, d log_decay_row,
    d log_decay_col), float32. d_out: the cotangent of the cell output, [B, N, H, dv]."""
    layout = ChunkLayout.make(grid, "2d", block.block_tokens, block.block_tokens_2d)
    d_out_in = d_out.astype(q.dtype)  # the op returns q.dtype: d_out holds no more precision
    dq = run_kernel(d_out_in, v, k, log_decay_row, log_decay_col, grid=grid, variant="2d", backend="gpu",
                    interpret=interpret, block=block, tangent=None, out_dtype=jnp.float32)
    decays = jnp.stack([log_decay_row, log_decay_col], axis=1).astype(jnp.float32)  # [H, 2]
    d, dv = q.shape[-1], v.shape[-1]
    d_pad, dv_pad = padded_dim("gpu", d), padded_dim("gpu", dv)
    packed = [_pad_last(layout.pack(x), size) for x, size in ((q, d_pad), (k, d_pad), (v, dv_pad), (d_out_in, dv_pad))]
    dk, dk_col, d_v = pallas_sweep.key_gradients(*packed, decays, layout=layout, block=block, interpret=interpret)
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


@functools.lru_cache(maxsize=None)
def pallas_cells(backend: str, interpret: bool, block: BlockSizes):
    """cells(q, k, v, log_decay_row, log_decay_col, grid, variant) -> [B, N, H, dv] in q.dtype,
    with the custom_vjp described in the module docstring. grid and variant are static."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if block.backward_2d == "sweep" and backend != "gpu":
        raise ValueError(
            f"BlockSizes(backward_2d='sweep') has a GPU (Triton) kernel only, not one for backend {backend!r}; "
            "use backward_2d='refwd'"
        )
    kernel = functools.partial(run_kernel, backend=backend, interpret=interpret, block=block)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def cells(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return kernel(q, k, v, log_decay_row, log_decay_col, grid=grid, variant=variant, tangent=None, out_dtype=q.dtype)

    def forward(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return cells(q, k, v, log_decay_row, log_decay_col, grid, variant), (q, k, v, log_decay_row, log_decay_col)

    def backward(grid, variant, residuals, d_out):
        q, k, v, log_decay_row, log_decay_col = residuals
        if variant == "2d" and block.backward_2d == "sweep":
            dq, dk, dv, d_row, d_col = sweep_backward(
                q, k, v, log_decay_row, log_decay_col, d_out, grid=grid, interpret=interpret, block=block
            )
            return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
                    d_row.astype(log_decay_row.dtype), d_col.astype(log_decay_col.dtype))
        if variant != "2d" and block.backward_generic == "chunks":
            dq, dk, dv, d_row, d_col = chunk_backward(
                q, k, v, log_decay_row, log_decay_col, d_out, grid=grid, variant=variant, backend=backend,
                interpret=interpret, block=block,
            )
            return dq, dk, dv, d_row.astype(log_decay_row.dtype), d_col.astype(log_decay_col.dtype)
        run = functools.partial(
            kernel, log_decay_row=log_decay_row, log_decay_col=log_decay_col, grid=grid, variant=variant,
            out_dtype=jnp.float32,
        )
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

    cells.defvjp(forward, backward)
    return cells
