"""LASAD: linear attention whose decay comes from true 2D grid positions (docs/lasad.md).

`lasad_attention` is the one public entry point; `impl` picks the algorithm, resolved in
`resolve_impl` and nowhere else. The decode API (`init_state`, `fold_prefix`, `decode_step`) is the
recurrent algorithm's state and step.
"""

from __future__ import annotations

import functools

import jax

from lasadgen_jax.ops.lasad import autodiff, chunked, common, pallas, recurrent, reference, scan
from lasadgen_jax.ops.lasad.common import VARIANTS
from lasadgen_jax.ops.lasad.pallas_chunk import BlockSizes
from lasadgen_jax.ops.lasad.recurrent import decode_step, fold_prefix, init_state

__all__ = [
    "BlockSizes",
    "AUTO_IMPL",
    "IMPLS",
    "VARIANTS",
    "auto_impl",
    "decode_step",
    "fold_prefix",
    "init_state",
    "lasad_attention",
    "lasad_attention_pallas",
    "resolve_impl",
]

IMPLS = ("auto", "reference", "recurrent", "scan", "chunked", "pallas")

# What impl="auto" runs, by backend and variant: a fixed table, decided by the H200 run of
# benchmarks/kernels.py (benchmarks/RESULTS.md, issue 6, 2026-11-29; B*N = 32768 tokens, H = 16,
# d = dv = 64, bf16, N = 256 ... 16384). The Pallas kernel where its forward+backward beat the
# pure-XLA `chunked` algorithm of the same variant at every size measured, `chunked` elsewhere:
AUTO_IMPL = {
    **{("cpu", variant): "chunked" for variant in VARIANTS},  # no kernel on CPU
    # Generic kernel, forward+backward 3.0-4.1x faster than chunked at every size measured.
    ("gpu", "1d"): "pallas",
    # Generic kernel, forward+backward 3.2-3.9x faster than chunked at every size measured.
    ("gpu", "2d_row"): "pallas",
    # The generic kernel as well, but `none` was never timed on the GPU (only checked): not yet.
    ("gpu", "none"): "chunked",
    # 2d kernel: forward+backward 3.5x / 2.8x slower than chunked at N = 256 / 1024 (2.2x faster
    # at 4096): its decay-gradient (tangent) calls dominate the backward. The configs' grids
    # are 16x16 and 24x24, where the kernel loses, so chunked stays.
    ("gpu", "2d"): "chunked",
    # The Mosaic TPU kernels have run in interpret mode only, never through Mosaic's compiler on a
    # TPU nor timed: a default must not rest on them. impl="pallas" asks for them explicitly.
    **{("tpu", variant): "chunked" for variant in VARIANTS},
}

# Algorithms differentiated by recomputation (autodiff.py); `reference` uses plain autodiff.
_CELL_ALGORITHMS = {
    "recurrent": autodiff.with_recompute_vjp(recurrent.recurrent_cells),
    "scan": autodiff.with_recompute_vjp(scan.scan_cells),
    "chunked": autodiff.with_recompute_vjp(chunked.chunked_cells),
}


def auto_impl(backend: str, variant: str) -> str:
    """The algorithm impl='auto' runs for `variant` on `backend` ('cpu', 'gpu' or 'tpu'): the
    AUTO_IMPL entry, whose comments say why. Depends on nothing else (not on sizes or dtypes)."""
    common.check_variant(variant)
    if (backend, variant) not in AUTO_IMPL:
        raise ValueError(f"impl='auto' knows the backends ('cpu', 'gpu', 'tpu'), got {backend!r}")
    return AUTO_IMPL[backend, variant]


def resolve_impl(impl: str, variant: str | None = None, backend: str | None = None) -> str:
    """The one place that maps `impl` to an algorithm.

    Any impl but 'auto' is returned as given (`pallas` raises later, on CPU). 'auto' becomes
    `auto_impl(backend, variant)`, backend defaulting to jax's default backend: on the GPU the
    kernel for `1d` and `2d_row`, `chunked` for `2d` and `none`; `chunked` on CPU and TPU.
    Without a variant only `impl` is checked and returned unchanged (how callers validate a
    config before the variant matters).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto" or variant is None:
        return impl
    return auto_impl(pallas.backend_name(jax.default_backend()) if backend is None else backend, variant)


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
      impl: 'auto', 'reference', 'recurrent', 'scan', 'chunked' or 'pallas' (the GPU or TPU kernel
        of jax's default backend; an error on CPU). 'auto' is a fixed choice by backend and
        variant (AUTO_IMPL): the kernel on GPU for '1d' and '2d_row', else 'chunked'.

    Returns:
      [batch, h*w, heads, dv] in q's dtype; computed with float32 states and accumulation.
    """
    impl = resolve_impl(impl, variant)
    if impl == "pallas":
        cells = pallas.pallas_cells(pallas.default_backend(), False, BlockSizes())
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
    return autodiff.with_recompute_vjp(functools.partial(chunked.chunked_cells, block_tokens=block_tokens))
