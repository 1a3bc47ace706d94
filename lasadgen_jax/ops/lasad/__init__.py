"""LASAD: linear attention whose decay comes from true 2D grid positions (docs/lasad.md).

`lasad_attention` is the one public entry point; `impl` picks the algorithm, resolved in
`resolve_impl` and nowhere else. The decode API (`init_state`, `fold_prefix`, `decode_step`) is the
recurrent algorithm's state and step.
"""

from __future__ import annotations

import functools

import jax

from lasadgen_jax.ops.lasad import (autodiff, chunked, common, pallas, pallas_parallel, parallel, recurrent,
                                    reference, scan)
from lasadgen_jax.ops.lasad.common import VARIANTS
from lasadgen_jax.ops.lasad.pallas_chunk import BlockSizes
from lasadgen_jax.ops.lasad.pallas_parallel import ParallelBlocks
from lasadgen_jax.ops.lasad.recurrent import decode_step, fold_prefix, init_state

__all__ = [
    "BlockSizes",
    "AUTO_IMPL",
    "IMPLS",
    "ParallelBlocks",
    "VARIANTS",
    "auto_impl",
    "decode_step",
    "fold_prefix",
    "init_state",
    "lasad_attention",
    "lasad_attention_pallas",
    "lasad_attention_parallel",
    "resolve_impl",
]

IMPLS = ("auto", "reference", "recurrent", "scan", "chunked", "parallel", "pallas", "pallas_parallel")

# What impl="auto" runs, by backend, variant and sequence length N = h*w: a fixed table, decided by
# the H200 runs of benchmarks/kernels.py (benchmarks/RESULTS.md, issue 6, 2026-11-29; B*N = 32768
# tokens, H = 16, d = dv = 64, bf16). Each entry: (largest N, algorithm) steps, the first that
# holds wins, None = any N. A step's bound is the largest N where its choice was measured to win:
# between measured sizes the table takes the choice measured at the smaller one.

# Between the pure-XLA algorithms (CPU; benchmarks/lasad_ops.py on 2 cores, batch 32, 4 heads,
# d = 48, float32): the `parallel` form's forward+backward against `chunked`: `2d` 3.3x / 2.2x /
# 1.6x faster at N = 64 / 256 / 576 and even at 1024; `1d`, `2d_row`, `none` 1.9x / 2.3x / 1.6x
# faster at 64, even or slower from 256 on.
_XLA_STEPS = {
    "2d": ((576, "parallel"), (None, "chunked")),
    **{variant: ((64, "parallel"), (None, "chunked")) for variant in ("2d_row", "1d", "none")},
}
AUTO_IMPL = {
    **{("cpu", variant): steps for variant, steps in _XLA_STEPS.items()},  # no kernels on CPU
    # The generic kernel with its chunk backward, forward+backward against the parallel-form
    # kernel's: N = 256 0.55-0.63 ms against 0.78-0.97 (flash 0.73), N = 1024 0.55-0.63 against
    # 1.52-2.27; 4.1-4.8x faster than flash at 4096 and 9.6-11.6x at 16384. The generic kernel at
    # every N (on a Hopper its Mosaic GPU bodies, BlockSizes.gpu_lowering: 1.4-1.6x / 4.9-6.0x /
    # 9.4-12.9x faster than flash at 256 / 4096 / 16384).
    **{("gpu", variant): ((None, "pallas"),) for variant in ("1d", "2d_row", "none")},
    # Parallel kernel 37x / 28x / 20x faster than chunked at N = 256 / 1024 / 4096 (and 124x / 30x
    # faster than the 2d chunked kernel at 256 / 1024); 22 ms forward+backward at 16384. Its
    # quadratic work grows 4x per doubling of the side, chunked's linearly: chunked above 16384.
    ("gpu", "2d"): ((16384, "pallas_parallel"), (None, "chunked")),
    # TPU: nothing has been timed on a TPU. The Mosaic TPU kernels (chunked and parallel-form) have
    # run in interpret mode only, never through Mosaic's compiler on a TPU: a default must not rest
    # on them (impl="pallas" / "pallas_parallel" ask for them explicitly). Between the two pure-XLA
    # algorithms, the CPU's choices, the only measured ones: a TPU's matrix units make the quadratic
    # form's matmuls cheaper against memory traffic than a CPU does, so they favour `parallel` at
    # least as much, while `2d`'s `chunked` moves the w column states through HBM every row (at
    # 16x16, batch 32, 16 heads: 134 MB per row step, forward and backward; on the H200 it was 35x
    # slower than flash at N = 256). Not measured on a TPU.
    **{("tpu", variant): steps for variant, steps in _XLA_STEPS.items()},
}

# The pure-XLA algorithms: by recomputation (autodiff.py), `chunked` by the chunk backward (but
# `2d`: recomputation), `parallel` by its own backward; `reference` uses plain autodiff.
_CELL_ALGORITHMS = {
    "recurrent": autodiff.with_recompute_vjp(recurrent.recurrent_cells),
    "scan": autodiff.with_recompute_vjp(scan.scan_cells),
    "chunked": chunked.chunked_with_vjp(),
    "parallel": parallel.parallel_cells,  # its own custom_vjp (parallel.py)
}


def auto_impl(backend: str, variant: str, tokens: int) -> str:
    """The algorithm impl='auto' runs for `variant` on `backend` ('cpu', 'gpu' or 'tpu') at
    sequence length `tokens` (h*w): the AUTO_IMPL entry, whose comments say why. Not dtype-dependent."""
    common.check_variant(variant)
    if (backend, variant) not in AUTO_IMPL:
        raise ValueError(f"impl='auto' knows the backends ('cpu', 'gpu', 'tpu'), got {backend!r}")
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"impl='auto' needs the sequence length (h*w) as a positive int, got {tokens!r}")
    for largest, impl in AUTO_IMPL[backend, variant]:
        if largest is None or tokens <= largest:
            return impl
    raise AssertionError(f"AUTO_IMPL[{backend!r}, {variant!r}] has no catch-all step")


def resolve_impl(impl: str, variant: str | None = None, backend: str | None = None, tokens: int | None = None) -> str:
    """The one place that maps `impl` to an algorithm.

    Any impl but 'auto' is returned as given (the kernels raise later, on CPU). 'auto' becomes
    `auto_impl(backend, variant, tokens)`, backend defaulting to jax's default backend: on the GPU
    a Pallas kernel (which one depends on the variant), `chunked` for `2d` beyond 16384 tokens; on
    CPU `parallel` at short N, else `chunked`; `chunked` on TPU. Without a variant only `impl` is checked and returned unchanged
    (how callers validate a config before the variant matters); with one, tokens is required.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto" or variant is None:
        return impl
    if tokens is None:
        raise ValueError("resolve_impl('auto', variant) needs tokens= (the sequence length h*w)")
    backend = pallas.backend_name(jax.default_backend()) if backend is None else backend
    return auto_impl(backend, variant, tokens)


def lasad_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    grid: tuple[int, int],
    variant: str,
    log_decay_row: jax.Array | None = None,
    log_decay_col: jax.Array | None = None,
    prefix_k: jax.Array | None = None,
    prefix_v: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
    """LASAD attention over an h x w token grid in raster order.

        o_a = sum_{m<a} D(a, m) (q_a . k_m) v_m + sum_p (q_a . prefix_k_p) prefix_v_p

    Args:
      q, k: [batch, h*w, heads, d]; q[a] is the query that predicts cell a, k[m] the key of cell m.
      v: [batch, h*w, heads, dv].
      grid: (h, w).
      variant: '2d' (g_row^dr * g_col^|dc|), '2d_row' (g_col^dc in the row, else g_row^dr),
        '1d' (g^(a-m), g from log_decay_col) or 'none' (no decay).
      log_decay_row, log_decay_col: [heads] log decays (<= 0), as far as the variant uses them.
      prefix_k, prefix_v: optional [batch, P, heads, d|dv] condition keys/values, never decayed.
      impl: 'auto', 'reference', 'recurrent', 'scan', 'chunked', 'parallel' (the quadratic form in
        XLA: O(N^2 d), fast at short sequences), 'pallas' (the chunked GPU or TPU
        kernel of jax's default backend; an error on CPU) or 'pallas_parallel' (the fused
        parallel-form GPU kernel, O(N^2 d): fastest at short sequences). 'auto' is a fixed choice by
        backend, variant and N (AUTO_IMPL): a kernel on GPU; on CPU 'parallel' at short N, else
        'chunked'; 'chunked' on TPU.

    Returns:
      [batch, h*w, heads, dv] in q's dtype; computed with float32 states and accumulation.
    """
    h, w = common.check_grid(grid)
    impl = resolve_impl(impl, variant, tokens=h * w)
    if impl == "pallas":
        cells = pallas.pallas_cells(pallas.default_backend(), False, BlockSizes())
    elif impl == "pallas_parallel":
        if pallas.PLATFORMS.get(jax.default_backend()) not in pallas_parallel.BACKENDS:
            raise ValueError(
                f"impl='pallas_parallel' needs a GPU or TPU, but jax's default backend is {jax.default_backend()!r}; "
                "use impl='chunked' (or 'auto'), or lasad_attention_parallel(..., interpret=True) to run the "
                "kernel in interpret mode"
            )
        cells = pallas_parallel.parallel_cells(pallas.default_backend(), False, ParallelBlocks())
    else:
        cells = None if impl == "reference" else _CELL_ALGORITHMS[impl]
    return _attention(q, k, v, grid, variant, log_decay_row, log_decay_col, prefix_k, prefix_v, cells)


def lasad_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    grid: tuple[int, int],
    variant: str,
    log_decay_row: jax.Array | None = None,
    log_decay_col: jax.Array | None = None,
    prefix_k: jax.Array | None = None,
    prefix_v: jax.Array | None = None,
    backend: str,
    interpret: bool = False,
    block_sizes: BlockSizes = BlockSizes(),
) -> jax.Array:
    """`lasad_attention` through an explicit Pallas kernel: backend 'gpu' (Triton) or 'tpu'
    (Mosaic TPU), optionally in interpret mode (how the tests run the kernels on CPU)."""
    cells = pallas.pallas_cells(backend, bool(interpret), block_sizes)
    return _attention(q, k, v, grid, variant, log_decay_row, log_decay_col, prefix_k, prefix_v, cells)


def lasad_attention_parallel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    grid: tuple[int, int],
    variant: str,
    log_decay_row: jax.Array | None = None,
    log_decay_col: jax.Array | None = None,
    prefix_k: jax.Array | None = None,
    prefix_v: jax.Array | None = None,
    backend: str = "gpu",
    interpret: bool = False,
    blocks: ParallelBlocks = ParallelBlocks(),
) -> jax.Array:
    """`lasad_attention` through the fused parallel-form kernel (pallas_parallel.py) of an explicit
    backend ('gpu': Triton, with `blocks`; 'tpu': Mosaic TPU, 128-token tiles), optionally in
    interpret mode (how the tests run it on CPU)."""
    cells = pallas_parallel.parallel_cells(backend, bool(interpret), blocks)
    return _attention(q, k, v, grid, variant, log_decay_row, log_decay_col, prefix_k, prefix_v, cells)


def _attention(q, k, v, grid, variant, log_decay_row, log_decay_col, prefix_k, prefix_v, cells):
    """Checks the inputs, then the reference (cells None) or cells + the undecayed prefix term."""
    grid = common.check_grid(grid)
    common.check_variant(variant)
    batch, _, heads, d, dv = common.check_qkv(q, k, v, grid)
    common.check_prefix(prefix_k, prefix_v, batch, heads, d, dv, q.dtype)
    log_decay_row, log_decay_col = common.check_log_decays(variant, log_decay_row, log_decay_col, heads)

    if cells is None:
        out = reference.lasad_reference(
            q, k, v, grid=grid, variant=variant, log_decay_row=log_decay_row,
            log_decay_col=log_decay_col, prefix_k=prefix_k, prefix_v=prefix_v,
        )
    else:
        out = cells(q, k, v, log_decay_row, log_decay_col, grid, variant)
        if prefix_k is not None:
            out = out + common.mm("bnhd,bhde->bnhe", q, common.prefix_state(prefix_k, prefix_v), q.dtype)
    return out.astype(q.dtype)


@functools.lru_cache(maxsize=None)
def chunked_with_block_size(block_tokens: int):
    """The chunked algorithm with a chosen block size (tests and benchmarks sweep it)."""
    return chunked.chunked_with_vjp(block_tokens)
