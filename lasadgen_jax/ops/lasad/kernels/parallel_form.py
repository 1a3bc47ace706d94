"""LASAD in its parallel form as one fused kernel: `impl="pallas_parallel"` (GPU: Triton lowering;
TPU: Mosaic TPU).

    o_a = sum_{m<a} D(a, m) (q_a . k_m) v_m        (no prefix: lasad_attention adds it)

computed the way flash attention computes softmax attention: tiles of queries against tiles of
keys, the decay D(a, m) = exp(log D) evaluated on chip from the two tiles' grid positions, the
N x N weights never leaving the chip. O(N^2 d) work and no states, against O(N d dv) for the
chunked kernels: at short sequences (the 16x16 and 24x24 token grids of the configs) fewer,
larger matmuls and no sequential walk win (benchmarks/RESULTS.md, "The fused parallel-form kernel
(`impl="pallas_parallel"`)"). Every variant uses the same body; only the formula of
log D and of its derivatives along the two log decays differ (`common.pair_log_decay`).

Backward, as in flash attention, two kernels: one per key tile (dk, dv and the decay gradients,
walking the query tiles after it) and one per query tile for dq, which is the forward kernel on
swapped operands: dq_a = sum_{m<a} D(a, m) (dO_a . v_m) k_m = forward(q=dO, k=v, v=k).
With S = q k^T, dP = dO v^T and W = D * S, the gradients are

    dv = W^T dO,   dS = D * dP,   dk = dS^T q,   dq = dS k,
    d log g = sum_{a,m} (d log D(a,m) / d log g) * D * S * dP,

the last summed per key inside the kernel and over keys outside it. Nothing of size N^2 or
N d dv goes to HBM. Decays and accumulation are float32; matmul inputs keep the input dtype.

GPU programs walk their tiles in a loop (`fori_loop`, the Triton way). TPU programs see one
(query tile, key tile) pair per grid step: the walked axis is the last grid axis, "arbitrary",
with the accumulators in VMEM scratch; tiles past the diagonal are skipped (`pl.when`) and their
index maps clamped so that they fetch nothing new. TPU tiles are 128 tokens (`TPU_BLOCK`) and
head dims are padded to 128 lanes; inputs go heads-major, [B, H, L, e].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from lasadgen_jax.ops.lasad import common
from lasadgen_jax.ops.lasad.chunk_math import dot
from lasadgen_jax.ops.lasad.kernels.backend import call_with_poison, check_backend, padded_dim, stack_decays

TPU_BLOCK = 128  # tokens per TPU tile (query and key); a multiple of Mosaic's (8, 128) tiling


@dataclasses.dataclass(frozen=True)
class ParallelBlocks:
    """Tiles of the GPU parallel kernel: `block` queries x `block` keys per step (a power of two
    >= 16), Triton's num_warps and num_stages. The TPU kernel always uses TPU_BLOCK-token tiles."""

    block: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"ParallelBlocks.{name} must be a power of two >= 1, got {value!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"ParallelBlocks.num_stages must be an int >= 1, got {self.num_stages!r}")
        if self.block < 16:
            raise ValueError(f"ParallelBlocks.block must be >= 16 (matrix-unit tiles), got {self.block}")


def _positions(start, size: int, axis: int):
    """Token indices start ... start+size-1 as an int32 [size, 1] (axis 0) or [1, size] (axis 1)."""
    shape = (size, 1) if axis == 0 else (1, size)
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _decay(variant, width, query_pos, key_pos, log_row, log_col):
    """(D with zeros where key >= query, d log D / d log g_row, ... / d log g_col) for one tile pair."""
    causal = key_pos < query_pos
    log_d, by_row, by_col = common.pair_log_decay(variant, width, query_pos, key_pos, log_row, log_col)
    if log_d is None:
        return jnp.where(causal, 1.0, 0.0), None, None
    return jnp.where(causal, jnp.exp(jnp.where(causal, log_d, 0.0)), 0.0), by_row, by_col


# ----------------------------------------------------------------------------- kernels


def _forward_kernel(decay_ref, q_ref, k_ref, v_ref, out_ref, *, variant, width, block):
    """One query tile: out = sum over key tiles j <= i of (D * q k^T) v."""
    i = pl.program_id(2)
    log_row, log_col = decay_ref[0], decay_ref[1]
    q = q_ref[...]
    query_pos = _positions(i * block, block, 0)

    def key_tile(j, acc):
        keys = pl.ds(pl.multiple_of(j * block, block), block)
        k, v = k_ref[keys, :], v_ref[keys, :]
        decay, _, _ = _decay(variant, width, query_pos, _positions(j * block, block, 1), log_row, log_col)
        weights = dot(q, k, (1, 1)) * decay
        return acc + dot(weights.astype(v.dtype), v)

    acc = jax.lax.fori_loop(0, i + 1, key_tile, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _key_grads_kernel(decay_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, drow_ref, dcol_ref, *, variant, width,
                      block, num_tiles):
    """One key tile: dk, dv and its keys' shares of the decay gradients, over query tiles i >= j."""
    j = pl.program_id(2)
    log_row, log_col = decay_ref[0], decay_ref[1]
    k, v = k_ref[...], v_ref[...]
    key_pos = _positions(j * block, block, 1)

    def query_tile(i, carry):
        dk, dv, drow, dcol = carry
        queries = pl.ds(pl.multiple_of(i * block, block), block)
        q, d_out = q_ref[queries, :], do_ref[queries, :]
        decay, by_row, by_col = _decay(variant, width, _positions(i * block, block, 0), key_pos, log_row, log_col)
        scores, d_scores = dot(q, k, (1, 1)), dot(d_out, v, (1, 1))
        dv = dv + dot((decay * scores).astype(d_out.dtype), d_out, (0, 0))
        d_weights = decay * d_scores
        dk = dk + dot(d_weights.astype(q.dtype), q, (0, 0))
        pair = d_weights * scores  # d loss / d log D(a, m)
        if by_row is not None:
            drow = drow + jnp.sum(pair * by_row, axis=0, keepdims=True)
        if by_col is not None:
            dcol = dcol + jnp.sum(pair * by_col, axis=0, keepdims=True)
        return dk, dv, drow, dcol

    zeros = lambda shape: jnp.zeros(shape, jnp.float32)
    dk, dv, drow, dcol = jax.lax.fori_loop(
        j, num_tiles, query_tile, (zeros(dk_ref.shape), zeros(dv_ref.shape), zeros((1, block)), zeros((1, block)))
    )
    dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)
    drow_ref[...], dcol_ref[...] = drow, dcol


# ----------------------------------------------------------------------------- TPU kernels


def _tpu_forward_kernel(decay_ref, q_ref, k_ref, v_ref, out_ref, acc_ref, *, variant, width):
    """Grid step (b, h, query tile i, key tile j): acc += (D * q k^T) v for j <= i."""
    head, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j <= i)
    def _():
        decay, _, _ = _decay(variant, width, _positions(i * TPU_BLOCK, TPU_BLOCK, 0),
                             _positions(j * TPU_BLOCK, TPU_BLOCK, 1), decay_ref[head, 0], decay_ref[head, 1])
        weights = dot(q_ref[...], k_ref[...], (1, 1)) * decay
        acc_ref[...] += dot(weights.astype(v_ref.dtype), v_ref[...])

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tpu_key_grads_kernel(decay_ref, q_ref, k_ref, v_ref, do_ref, dk_ref, dv_ref, drow_ref, dcol_ref,
                          dk_acc, dv_acc, drow_acc, dcol_acc, *, variant, width):
    """Grid step (b, h, key tile j, query tile i): dk, dv and the per-key decay sums for i >= j."""
    head, j, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _():
        for ref in (dk_acc, dv_acc, drow_acc, dcol_acc):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    @pl.when(i >= j)
    def _():
        q, d_out = q_ref[...], do_ref[...]
        decay, by_row, by_col = _decay(variant, width, _positions(i * TPU_BLOCK, TPU_BLOCK, 0),
                                       _positions(j * TPU_BLOCK, TPU_BLOCK, 1), decay_ref[head, 0], decay_ref[head, 1])
        scores, d_scores = dot(q, k_ref[...], (1, 1)), dot(d_out, v_ref[...], (1, 1))
        dv_acc[...] += dot((decay * scores).astype(d_out.dtype), d_out, (0, 0))
        d_weights = decay * d_scores
        dk_acc[...] += dot(d_weights.astype(q.dtype), q, (0, 0))
        pair = d_weights * scores
        if by_row is not None:
            drow_acc[...] += jnp.sum(pair * by_row, axis=0, keepdims=True)
        if by_col is not None:
            dcol_acc[...] += jnp.sum(pair * by_col, axis=0, keepdims=True)

    @pl.when(i == pl.num_programs(3) - 1)
    def _():
        dk_ref[...], dv_ref[...] = dk_acc[...].astype(dk_ref.dtype), dv_acc[...].astype(dv_ref.dtype)
        drow_ref[...], dcol_ref[...] = drow_acc[...], dcol_acc[...]


# ----------------------------------------------------------------------------- calls


def _pad(x, length: int, dim: int):
    """[B, N, H, e] zero-padded to [B, length, H, dim]."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - x.shape[3])))


def _prepare(arrays, backend: str, block: int):
    """Pads the sequence to whole tiles and head dims to what the backend tiles; (padded, length)."""
    length = -(-arrays[0].shape[1] // block) * block
    return [_pad(x, length, padded_dim(backend, x.shape[-1])) for x in arrays], length


def _gpu_specs(length, block):
    """BlockSpecs of one tile of tokens and of the whole sequence, for a (batch, head, tile) grid."""
    tile = lambda dim: pl.BlockSpec((None, block, None, dim), lambda b, h, i: (b, i, h, 0))
    whole = lambda dim: pl.BlockSpec((None, length, None, dim), lambda b, h, i: (b, 0, h, 0))
    return tile, whole


def _tile_of(which: str, dim: int):
    """TPU BlockSpec of a [B, H, L, dim] operand: the grid's own tile (axis 2), the walked tile
    (axis 3) clamped to the diagonal from below ('min': keys for a query tile) or above ('max')."""
    index = {
        "own": lambda b, h, own, walked: (b, h, own, 0),
        "min": lambda b, h, own, walked: (b, h, jnp.minimum(walked, own), 0),
        "max": lambda b, h, own, walked: (b, h, jnp.maximum(walked, own), 0),
    }[which]
    return pl.BlockSpec((None, None, TPU_BLOCK, dim), index)


TPU_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def forward(q, k, v, decays, *, grid, variant, blocks: ParallelBlocks, interpret: bool, backend: str = "gpu",
            out_dtype=None, name: str = "", poison: bool = False):
    """[B, N, H, dv] in out_dtype (default q.dtype); q, k [B, N, H, d], v [B, N, H, dv]; decays
    [H, 2] float32. `name` suffixes the kernel's name (the backward's dq call is "_dq").
    poison=True (GPU, for checks) starts the output buffer as NaN, so an unwritten element shows."""
    check_backend(backend)
    batch, n, heads, _ = q.shape
    block = blocks.block if backend == "gpu" else TPU_BLOCK
    (q_p, k_p, v_p), length = _prepare((q, k, v), backend, block)
    d, dv = q_p.shape[-1], v_p.shape[-1]
    kernel_name = f"lasad_parallel_{variant}{name}"
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if backend == "gpu":
        tile, whole = _gpu_specs(length, block)
        out = call_with_poison(
            functools.partial(_forward_kernel, variant=variant, width=grid[1], block=block),
            (decays, q_p, k_p, v_p),
            out_shape=jax.ShapeDtypeStruct((batch, length, heads, dv), out_dtype),
            out_spec=tile(dv),
            poison=poison,
            grid=(batch, heads, length // block),
            in_specs=[pl.BlockSpec((None, 2), lambda b, h, i: (h, 0)), tile(d), whole(d), whole(dv)],
            compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
            interpret=interpret,
            name=kernel_name,
        )
        return out[:, :n, :, : v.shape[-1]]
    if poison:
        raise ValueError("poison is implemented for the GPU kernel only")
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    tiles = length // TPU_BLOCK
    out = pl.pallas_call(
        functools.partial(_tpu_forward_kernel, variant=variant, width=grid[1]),
        out_shape=jax.ShapeDtypeStruct((batch, heads, length, dv), out_dtype),
        grid=(batch, heads, tiles, tiles),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), _tile_of("own", d), _tile_of("min", d), _tile_of("min", dv)],
        out_specs=_tile_of("own", dv),
        scratch_shapes=[pltpu.VMEM((TPU_BLOCK, dv), jnp.float32)],
        compiler_params=TPU_SEMANTICS,
        interpret=interpret,
        name=kernel_name,
    )(decays, heads_major(q_p), heads_major(k_p), heads_major(v_p))
    return heads_major(out)[:, :n, :, : v.shape[-1]]


def _backward_gpu(q_p, k_p, v_p, do_p, decays, *, length, grid, variant, blocks, interpret):
    batch, _, heads, d = q_p.shape
    dv, block = v_p.shape[-1], blocks.block
    tile, whole = _gpu_specs(length, block)
    tiles = length // block
    decay_spec = pl.BlockSpec((None, 2), lambda b, h, i: (h, 0))
    params = pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    per_key = pl.BlockSpec((None, None, 1, block), lambda b, h, j: (b, h, 0, j))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    dk, dv_, d_row, d_col = pl.pallas_call(
        functools.partial(_key_grads_kernel, variant=variant, width=grid[1], block=block, num_tiles=tiles),
        out_shape=[jax.ShapeDtypeStruct((batch, length, heads, d), k_p.dtype),
                   jax.ShapeDtypeStruct((batch, length, heads, dv), v_p.dtype), f32(batch, heads, 1, length),
                   f32(batch, heads, 1, length)],
        grid=(batch, heads, tiles),
        in_specs=[decay_spec, whole(d), tile(d), tile(dv), whole(dv)],
        out_specs=[tile(d), tile(dv), per_key, per_key],
        compiler_params=params,
        interpret=interpret,
        name=f"lasad_parallel_{variant}_dkdv",
    )(decays, q_p, k_p, v_p, do_p)
    return dk, dv_, d_row, d_col


def _backward_tpu(q_p, k_p, v_p, do_p, decays, *, length, grid, variant, interpret):
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    q_p, k_p, v_p, do_p = map(heads_major, (q_p, k_p, v_p, do_p))
    batch, heads, _, d = q_p.shape
    dv, tiles = v_p.shape[-1], length // TPU_BLOCK
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    per_key = pl.BlockSpec((None, None, 1, TPU_BLOCK), lambda b, h, own, walked: (b, h, 0, own))
    dk, dv_, d_row, d_col = pl.pallas_call(
        functools.partial(_tpu_key_grads_kernel, variant=variant, width=grid[1]),
        out_shape=[jax.ShapeDtypeStruct((batch, heads, length, d), k_p.dtype),
                   jax.ShapeDtypeStruct((batch, heads, length, dv), v_p.dtype), f32(batch, heads, 1, length),
                   f32(batch, heads, 1, length)],
        grid=(batch, heads, tiles, tiles),
        in_specs=[smem, _tile_of("max", d), _tile_of("own", d), _tile_of("own", dv), _tile_of("max", dv)],
        out_specs=[_tile_of("own", d), _tile_of("own", dv), per_key, per_key],
        scratch_shapes=[pltpu.VMEM((TPU_BLOCK, d), jnp.float32), pltpu.VMEM((TPU_BLOCK, dv), jnp.float32),
                        pltpu.VMEM((1, TPU_BLOCK), jnp.float32), pltpu.VMEM((1, TPU_BLOCK), jnp.float32)],
        compiler_params=TPU_SEMANTICS,
        interpret=interpret,
        name=f"lasad_parallel_{variant}_dkdv",
    )(decays, q_p, k_p, v_p, do_p)
    return heads_major(dk), heads_major(dv_), d_row, d_col


def backward(q, k, v, decays, d_out, *, grid, variant, blocks: ParallelBlocks, interpret: bool, backend: str = "gpu"):
    """(dq, dk, dv, d log_decay_row, d log_decay_col): dq, dk, dv in the dtypes of q, k, v (accumulated in
    float32 and written once), decays [H] float32."""
    check_backend(backend)
    n, heads = q.shape[1], q.shape[2]
    block = blocks.block if backend == "gpu" else TPU_BLOCK
    d_out = d_out.astype(q.dtype)  # the op returns q.dtype: d_out holds no more precision
    padded, length = _prepare((q, k, v, d_out), backend, block)
    kwargs = dict(length=length, grid=grid, variant=variant, interpret=interpret)
    if backend == "gpu":
        dk, dv, d_row, d_col = _backward_gpu(*padded, decays, blocks=blocks, **kwargs)
    else:
        dk, dv, d_row, d_col = _backward_tpu(*padded, decays, **kwargs)
    dq = forward(d_out, v, k, decays, grid=grid, variant=variant, blocks=blocks, interpret=interpret,
                 backend=backend, out_dtype=q.dtype, name="_dq")
    cut = lambda x, dim: x[:, :n, :, :dim]
    uses_row, uses_col = common.USES_DECAY[variant]
    decay_grad = lambda x, used: jnp.sum(x, axis=(0, 2, 3)) if used else jnp.zeros((heads,), jnp.float32)
    return (dq, cut(dk, q.shape[-1]), cut(dv, v.shape[-1]),
            decay_grad(d_row, uses_row), decay_grad(d_col, uses_col))


@functools.lru_cache(maxsize=None)
def parallel_form_cells(backend: str, interpret: bool, blocks: ParallelBlocks):
    """cells(q, k, v, log_decay_row, log_decay_col, grid, variant) -> [B, N, H, dv] in q.dtype, the
    fused parallel-form kernel of `backend` ('gpu' or 'tpu') with its two backward kernels; grid
    and variant static."""
    check_backend(backend)
    options = dict(blocks=blocks, interpret=interpret, backend=backend)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def cells(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return forward(q, k, v, stack_decays(log_decay_row, log_decay_col), grid=grid, variant=variant, **options)

    def cells_forward(q, k, v, log_decay_row, log_decay_col, grid, variant):
        out = cells(q, k, v, log_decay_row, log_decay_col, grid, variant)
        return out, (q, k, v, log_decay_row, log_decay_col)

    def cells_backward(grid, variant, residuals, d_out):
        q, k, v, log_decay_row, log_decay_col = residuals
        dq, dk, dv, d_row, d_col = backward(q, k, v, stack_decays(log_decay_row, log_decay_col), d_out, grid=grid,
                                            variant=variant, **options)
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
                d_row.astype(log_decay_row.dtype), d_col.astype(log_decay_col.dtype))

    cells.defvjp(cells_forward, cells_backward)
    return cells
