"""The Pallas kernels behind `impl="pallas"`: layout, backend choice and gradients (docs/lasad.md §6).

The kernels themselves are in pallas_gpu.py (Triton) and pallas_tpu.py (Mosaic TPU); both compute
the cell part of LASAD (no prefix) with the arithmetic of pallas_chunk.py. This module packs the
inputs into chunks, pads head dims to what the backend tiles (powers of two >= 16 on GPU,
multiples of 128 lanes on TPU), and wires the backward pass with `jax.custom_vjp`:

    dq = forward(q=do, k=v, v=k)
    dk = flip(forward(q=flip v,  k=flip do, v=flip q))
    dv = flip(forward(q=flip k,  k=flip q,  v=flip do))

(the recomputation of autodiff.py: `flip` turns the grid by 180 degrees), each a call of the same
forward kernel. The log decays need no forward-mode pass through the kernel. With
X(a, m) = D(a, m) (q_a . k_m)(do_a . v_m), the gradient along log_decay_row is
sum_{a,m} (r_a - r_m) X(a, m), and since sum_m X(a, m) = q_a . dq_a and sum_a X(a, m) = k_m . dk_m,

    dL/dlog_row = sum_a r_a (q_a . dq_a) - sum_m r_m (k_m . dk_m)

(raster index instead of row for `1d`'s single decay). The column decay of `2d` and `2d_row`
enters through |c_a - c_m| (or c_a - c_m within a row), which does not split that way: one more
kernel call in tangent mode computes o'_a = sum_m dD(a, m)/dlog_col (q_a . k_m) v_m and
dL/dlog_col = sum_a do_a . o'_a. Nothing of size O(N d dv) is stored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lasadgen_jax.ops.lasad import common, pallas_gpu, pallas_tpu
from lasadgen_jax.ops.lasad.pallas_chunk import BlockSizes, ChunkLayout, next_power_of_two

BACKENDS = ("gpu", "tpu")


def default_backend() -> str:
    """The kernel backend of jax's default device; raises on CPU (no silent fallback)."""
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    raise ValueError(
        f"impl='pallas' needs a GPU or TPU, but jax's default backend is {platform!r}; use "
        "impl='chunked' (or 'auto'), or lasad_attention_pallas(..., backend=..., interpret=True) to "
        "run the kernels in interpret mode"
    )


def _pad_last(x, size: int):
    return x if x.shape[-1] == size else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, size - x.shape[-1]),))


def _padded_dim(backend: str, size: int) -> int:
    if backend == "gpu":
        return next_power_of_two(max(16, size))
    return -(-size // pallas_tpu.LANES) * pallas_tpu.LANES


def run_kernel(q, k, v, log_decay_row, log_decay_col, *, grid, variant, backend, interpret, block, tangent, out_dtype,
               poison=False):
    """The forward kernel on [B, N, H, *] inputs: [B, N, H, dv] in out_dtype (no prefix).

    poison=True (GPU only; for checks) starts the kernel's output buffer as NaN."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    layout = ChunkLayout.make(grid, variant, block.block_tokens)
    decays = jnp.stack([log_decay_row, log_decay_col], axis=1).astype(jnp.float32)  # [H, 2]
    d, dv = q.shape[-1], v.shape[-1]
    d_pad, dv_pad = _padded_dim(backend, d), _padded_dim(backend, dv)
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


def _decay_gradients(variant, grid, q, k, dq, dk, column_tangent, d_out, log_decay_row, log_decay_col):
    """Per-head gradients of the two log decays (zeros where the variant does not use one)."""
    h, w = grid
    position = jnp.arange(h * w)
    q_dq = jnp.einsum("bnhd,bnhd->bnh", q.astype(jnp.float32), dq)
    k_dk = jnp.einsum("bnhd,bnhd->bnh", k.astype(jnp.float32), dk)

    def moment(steps):  # sum_a s_a (q.dq)_a - sum_m s_m (k.dk)_m; centred to keep the terms small
        steps = (steps - jnp.mean(steps)).astype(jnp.float32)
        return jnp.einsum("n,bnh->h", steps, q_dq - k_dk)

    d_row, d_col = jnp.zeros_like(log_decay_row), jnp.zeros_like(log_decay_col)
    if variant == "1d":
        d_col = moment(position)
    elif variant in ("2d", "2d_row"):
        d_row = moment(position // w)
        d_col = jnp.einsum("bnhe,bnhe->h", d_out.astype(jnp.float32), column_tangent)
    return d_row.astype(log_decay_row.dtype), d_col.astype(log_decay_col.dtype)


@functools.lru_cache(maxsize=None)
def pallas_cells(backend: str, interpret: bool, block: BlockSizes):
    """cells(q, k, v, log_decay_row, log_decay_col, grid, variant) -> [B, N, H, dv] in q.dtype,
    with the custom_vjp described in the module docstring. grid and variant are static."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kernel = functools.partial(run_kernel, backend=backend, interpret=interpret, block=block)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def cells(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return kernel(q, k, v, log_decay_row, log_decay_col, grid=grid, variant=variant, tangent=False, out_dtype=q.dtype)

    def forward(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return cells(q, k, v, log_decay_row, log_decay_col, grid, variant), (q, k, v, log_decay_row, log_decay_col)

    def backward(grid, variant, residuals, d_out):
        q, k, v, log_decay_row, log_decay_col = residuals
        run = functools.partial(
            kernel, log_decay_row=log_decay_row, log_decay_col=log_decay_col, grid=grid, variant=variant,
            out_dtype=jnp.float32,
        )
        d_out_in = d_out.astype(q.dtype)  # the op returns q.dtype: d_out holds no more precision
        flip = lambda x: x[:, ::-1]
        dq = run(d_out_in, v, k, tangent=False)
        dk = flip(run(flip(v), flip(d_out_in), flip(q), tangent=False))
        dv = flip(run(flip(k), flip(q), flip(d_out_in), tangent=False))
        column_tangent = None
        if variant in ("2d", "2d_row"):
            column_tangent = run(q, k, v, tangent=True)
        d_row, d_col = _decay_gradients(
            variant, grid, q, k, dq, dk, column_tangent, d_out, log_decay_row, log_decay_col
        )
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_row, d_col

    cells.defvjp(forward, backward)
    return cells
