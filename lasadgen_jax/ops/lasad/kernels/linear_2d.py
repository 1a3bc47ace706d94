"""The linear-time exact `2d` kernel: `impl="pallas_linear"` (docs/lasad.md §8).

    o_a = sum_{m<a} g_row^(r_a - r_m) g_col^|c_a - c_m| (q_a . k_m) v_m      (no prefix)

in O(N) work: chunks of R whole rows, a masked matmul with the exact decays inside a chunk, and
the w column states C[c] (d x dv, float32) between chunks, folded by two one-sided scans along the
row (one pass per chunk, alternating direction: docs/lasad.md §8). The backward is one call of the
same forward kernel for dq (dq = forward(q=do, k=v, v=k)) and one reverse sweep carrying the
adjoint column states and their derivative along log g_row, which gives dk, dv and both log-decay
gradients pair-exact (no flips, no tangent re-runs). Only the inputs are kept between forward and
backward; nothing N x N or N x d x dv goes to HBM.

The chunk arithmetic (linear_2d_chunk.py) is shared by the two bodies: TPU (Mosaic TPU,
linear_2d_tpu.py: states in VMEM scratch, the chunks as the "arbitrary" grid axis) and GPU
(Triton lowering, linear_2d_gpu.py: states in a per-program HBM buffer). On a Hopper GPU,
`LinearBlocks(gpu_body="mosaic")` runs the forward and the backward's dq call through the Mosaic
GPU kernels of linear_2d_mgpu.py instead (column states in shared memory; the reverse sweep stays
Triton). This module packs the inputs, picks the body and wires the `custom_vjp`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lasadgen_jax.ops.lasad.chunk_math import ChunkLayout, next_power_of_two
from lasadgen_jax.ops.lasad.kernels import backend as kernel_backend
from lasadgen_jax.ops.lasad.kernels import linear_2d_gpu, linear_2d_mgpu, linear_2d_tpu
from lasadgen_jax.ops.lasad.kernels.linear_2d_chunk import ChunkGeometry

# Rows per chunk when LinearBlocks.rows is 0: GPU 16 (Triton's matmuls need M >= 16 for the
# per-column products), TPU 8 (one sublane tile of float32).
DEFAULT_ROWS = {"gpu": 16, "tpu": 8}
MIN_MATMUL_DIM = {"gpu": 16, "tpu": 1}  # Triton's dot needs every dim >= 16
GPU_BODIES = ("triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class LinearBlocks:
    """Tiles of the linear `2d` kernel.

    rows: rows per chunk R, a power of two (0: DEFAULT_ROWS of the backend); at most the grid's
      height rounded up to a power of two is used.
    dv_block: value columns per Triton program (a power of two >= 16, or 0); the program's column
      states are w x d x dv_block float32. 0 (the default) takes the widest of 64, 32, 16 that still
      launches MIN_PROGRAMS programs: 64-wide tiles were faster than 16 at N = 256..4096 (128-512
      programs) and slower at N = 16384, where they left 32 programs for 132 SMs (RESULTS.md,
      "Linear-time 2d kernel — 2026-12-06"). The TPU body always uses 128-lane value tiles.
    num_warps, num_stages: Triton launch parameters (GPU only).
    gpu_body: "triton" (the default) or "mosaic" (Hopper only: the forward and the backward's dq
      call as the Mosaic GPU kernels of linear_2d_mgpu.py; bf16/fp16, grids up to 64 wide, d <= 64,
      dv <= 64 with gradients (128 forward only); anything else raises; the reverse sweep stays Triton).
    mosaic_rows, mosaic_stages: the Mosaic GPU body's rows per chunk and its state kernel's
      pipeline stages (both bounded by shared memory: linear_2d_mgpu.unsupported).
    """

    rows: int = 0
    dv_block: int = 0
    num_warps: int = 4
    num_stages: int = 1
    gpu_body: str = "triton"
    mosaic_rows: int = 2
    mosaic_stages: int = 1

    def __post_init__(self):
        for name in ("rows", "dv_block", "num_warps", "mosaic_rows"):
            value = getattr(self, name)
            allowed_zero = name in ("rows", "dv_block") and value == 0
            if not isinstance(value, int) or (not allowed_zero and (value < 1 or value & (value - 1))):
                raise ValueError(f"LinearBlocks.{name} must be a power of two >= 1, got {value!r}")
        if 0 < self.dv_block < 16:
            raise ValueError(f"LinearBlocks.dv_block must be 0 or >= 16 (matrix-unit tiles), got {self.dv_block}")
        for name in ("num_stages", "mosaic_stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"LinearBlocks.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.gpu_body not in GPU_BODIES:
            raise ValueError(f"LinearBlocks.gpu_body must be one of {GPU_BODIES}, got {self.gpu_body!r}")


MIN_PROGRAMS = 128   # about one program per SM of an H100 (132) or H200 (132)


def triton_dv_block(blocks: LinearBlocks, batch: int, heads: int, dv: int) -> int:
    """The Triton body's value tile: blocks.dv_block, or for 0 the widest of 64, 32, 16 with at least
    MIN_PROGRAMS programs (batch x heads x value tiles), 16 when none has."""
    if blocks.dv_block:
        return blocks.dv_block
    for tile in (64, 32):
        if batch * heads * -(-dv // tile) >= MIN_PROGRAMS:
            return tile
    return 16


def _layout(grid, backend: str, blocks: LinearBlocks) -> ChunkLayout:
    rows = blocks.rows or DEFAULT_ROWS[backend]
    slots = next_power_of_two(max(16, grid[1]))
    return ChunkLayout.make(grid, "2d", rows * slots, block_tokens_2d=rows * slots)


def _padded_dims(backend: str, d: int, dv: int, dv_block: int) -> tuple[int, int]:
    if backend == "tpu":
        return kernel_backend.padded_dim("tpu", d), kernel_backend.padded_dim("tpu", dv)
    return next_power_of_two(max(16, d)), next_power_of_two(max(dv_block, dv))


def _run_forward(q, k, v, decays, *, grid, backend, blocks, interpret, name=""):
    """Float32 [B, N, H, dv] from [B, N, H, *] inputs through the backend's forward kernel."""
    if backend == "gpu" and blocks.gpu_body == "mosaic":
        if interpret:
            raise ValueError("LinearBlocks(gpu_body='mosaic') does not run in interpret mode (Mosaic GPU kernels need "
                             "a Hopper GPU); use gpu_body='triton' to interpret")
        return linear_2d_mgpu.forward(q, k, v, decays[:, 0], decays[:, 1], grid=grid, rows=blocks.mosaic_rows,
                                      max_concurrent_steps=blocks.mosaic_stages)
    layout = _layout(grid, backend, blocks)
    geometry = ChunkGeometry(layout.rows_per_chunk, layout.row_slots, grid[1], MIN_MATMUL_DIM[backend])
    dv_block = triton_dv_block(blocks, q.shape[0], q.shape[2], v.shape[-1])
    d, dv = _padded_dims(backend, q.shape[-1], v.shape[-1], dv_block)
    pad = lambda x, dim: jnp.pad(x, ((0, 0),) * 3 + ((0, dim - x.shape[-1]),))
    q_p, k_p, v_p = (layout.pack(pad(x, dim)) for x, dim in ((q, d), (k, d), (v, dv)))
    if backend == "gpu":
        out = linear_2d_gpu.forward(q_p, k_p, v_p, decays, geometry=geometry, num_chunks=layout.num_chunks,
                                    dv_block=dv_block, num_warps=blocks.num_warps,
                                    num_stages=blocks.num_stages, interpret=interpret, name=name)
    else:
        heads_major = lambda x: x.transpose(0, 2, 1, 3)
        out = linear_2d_tpu.forward(heads_major(q_p), heads_major(k_p), heads_major(v_p), decays, geometry=geometry,
                                    num_chunks=layout.num_chunks, interpret=interpret, name=name)
        out = heads_major(out)
    return layout.unpack(out)[..., : v.shape[-1]]


def _run_sweep(q, k, v, d_out, decays, *, grid, backend, blocks, interpret):
    """(dk, dv) float32 [B, N, H, *] and the log-decay gradients [H, 2] from the reverse sweep."""
    layout = _layout(grid, backend, blocks)
    geometry = ChunkGeometry(layout.rows_per_chunk, layout.row_slots, grid[1], MIN_MATMUL_DIM[backend])
    dv_block = triton_dv_block(blocks, q.shape[0], q.shape[2], v.shape[-1])
    d, dv = _padded_dims(backend, q.shape[-1], v.shape[-1], dv_block)
    pad = lambda x, dim: jnp.pad(x, ((0, 0),) * 3 + ((0, dim - x.shape[-1]),))
    packed = [layout.pack(pad(x, dim)) for x, dim in ((q, d), (k, d), (v, dv), (d_out, dv))]
    if backend == "gpu":
        dk, d_v, d_decays = linear_2d_gpu.reverse_sweep(
            *packed, decays, geometry=geometry, num_chunks=layout.num_chunks, dv_block=dv_block,
            num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret)
    else:
        heads_major = lambda x: x.transpose(0, 2, 1, 3)
        dk, d_v, d_decays = linear_2d_tpu.reverse_sweep(
            *map(heads_major, packed), decays, geometry=geometry, num_chunks=layout.num_chunks, interpret=interpret)
        dk, d_v = heads_major(dk), heads_major(d_v)
    return layout.unpack(dk)[..., : q.shape[-1]], layout.unpack(d_v)[..., : v.shape[-1]], d_decays


def _check(backend: str, variant: str):
    kernel_backend.check_backend(backend)
    if variant != "2d":
        raise ValueError(f"impl='pallas_linear' computes the '2d' variant only, got variant={variant!r}")


def forward(q, k, v, log_decay_row, log_decay_col, *, grid, backend: str, blocks: LinearBlocks = LinearBlocks(),
            interpret: bool = False):
    """Float32 [B, N, H, dv]: the cell part of `2d` LASAD (no prefix), no custom gradient."""
    _check(backend, "2d")
    decays = kernel_backend.stack_decays(log_decay_row, log_decay_col)
    return _run_forward(q, k, v, decays, grid=grid, backend=backend, blocks=blocks, interpret=interpret)


def backward(q, k, v, log_decay_row, log_decay_col, d_out, *, grid, backend: str,
             blocks: LinearBlocks = LinearBlocks(), interpret: bool = False):
    """(dq, dk, dv, d log_decay_row, d log_decay_col), float32: dq from the forward kernel on
    (do, v, k), the rest from one reverse sweep."""
    _check(backend, "2d")
    decays = kernel_backend.stack_decays(log_decay_row, log_decay_col)
    d_out = d_out.astype(q.dtype)  # the op returns q.dtype: d_out holds no more precision
    options = dict(grid=grid, backend=backend, blocks=blocks, interpret=interpret)
    dq = _run_forward(d_out, v, k, decays, name="_dq", **options)
    dk, d_v, d_decays = _run_sweep(q, k, v, d_out, decays, **options)
    return dq, dk, d_v, d_decays[:, 0], d_decays[:, 1]


@functools.cache
def linear_cells(backend: str, interpret: bool, blocks: LinearBlocks):
    """cells(q, k, v, log_decay_row, log_decay_col, grid, variant) -> [B, N, H, dv] in q.dtype with
    the sweep backward as its custom_vjp; grid and variant static, variant '2d' only."""
    _check(backend, "2d")
    options = dict(backend=backend, blocks=blocks, interpret=interpret)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def cells(q, k, v, log_decay_row, log_decay_col, grid, variant):
        _check(backend, variant)
        return forward(q, k, v, log_decay_row, log_decay_col, grid=grid, **options).astype(q.dtype)

    def cells_forward(q, k, v, log_decay_row, log_decay_col, grid, variant):
        out = cells(q, k, v, log_decay_row, log_decay_col, grid, variant)
        return out, (q, k, v, log_decay_row, log_decay_col)

    def cells_backward(grid, variant, residuals, d_out):
        q, k, v, log_decay_row, log_decay_col = residuals
        dq, dk, d_v, d_row, d_col = backward(q, k, v, log_decay_row, log_decay_col, d_out, grid=grid, **options)
        return (dq.astype(q.dtype), dk.astype(k.dtype), d_v.astype(v.dtype),
                d_row.astype(log_decay_row.dtype), d_col.astype(log_decay_col.dtype))

    cells.defvjp(cells_forward, cells_backward)
    return cells
