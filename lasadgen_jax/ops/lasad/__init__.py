"""LASAD: linear attention whose decay comes from true 2D grid positions (docs/lasad.md).

`lasad_attention` is the one public entry point; `impl` picks the algorithm, resolved in
`resolve_impl` and nowhere else. The decode API (`init_state`, `fold_prefix`, `decode_step`) is the
recurrent algorithm's state and step; `decode` runs a step through the implementation `decode_impl`
picks ('xla': that step, the reference and the CPU path; 'pallas': the fused kernel of
kernels/decode.py), resolved in `resolve_decode_impl` and nowhere else.
"""

from __future__ import annotations

import functools

import jax

from lasadgen_jax.ops.lasad import autodiff, chunked, common, parallel, recurrent, reference, scan
from lasadgen_jax.ops.lasad.common import VARIANTS
from lasadgen_jax.ops.lasad.kernels import backend as kernel_backend
from lasadgen_jax.ops.lasad.kernels import chunk, linear_2d, parallel_form, row_blocks
from lasadgen_jax.ops.lasad.kernels import decode as decode_kernels
from lasadgen_jax.ops.lasad.kernels.chunk import BlockSizes, ChunkOptions
from lasadgen_jax.ops.lasad.kernels.linear_2d import LinearBlocks
from lasadgen_jax.ops.lasad.kernels.parallel_form import ParallelBlocks
from lasadgen_jax.ops.lasad.kernels.row_blocks import RowBlocks
from lasadgen_jax.ops.lasad.recurrent import STATE_DTYPES, decode_step, fold_prefix, init_state

__all__ = [
    "AUTO_IMPL",
    "DECODE_IMPLS",
    "IMPLS",
    "KERNEL_IMPLS",
    "VARIANTS",
    "BlockSizes",
    "ChunkOptions",
    "LinearBlocks",
    "ParallelBlocks",
    "RowBlocks",
    "STATE_DTYPES",
    "auto_impl",
    "decode",
    "decode_step",
    "fold_prefix",
    "init_state",
    "lasad_attention",
    "lasad_attention_linear",
    "lasad_attention_pallas",
    "lasad_attention_parallel",
    "lasad_attention_row_blocks",
    "resolve_decode_impl",
    "resolve_impl",
]

IMPLS = ("auto", "reference", "recurrent", "scan", "chunked", "parallel", "pallas", "pallas_parallel", "pallas_linear",
         "pallas_row_blocks")
KERNEL_IMPLS = ("pallas", "pallas_parallel", "pallas_linear", "pallas_row_blocks")  # Pallas kernels: not on CPU

# What impl="auto" runs, by backend, variant and sequence length N = h*w: a fixed table. Each entry:
# (largest N, algorithm) steps, the first that holds wins, None = any N. A step's bound is the
# largest N where its choice was measured to win; between measured sizes the table takes the
# choice measured at the smaller one. Why each choice: benchmarks/RESULTS.md, "`impl="auto"` from
# these runs", and the sections cited below.

# Between the pure-XLA algorithms: the quadratic `parallel` form while it was measured faster
# forward+backward than `chunked`, `chunked` above (RESULTS.md, "CPU: the `parallel` algorithm
# against `chunked`, for `auto`").
_XLA_STEPS = {
    "2d": ((576, "parallel"), (None, "chunked")),
    **{variant: ((64, "parallel"), (None, "chunked")) for variant in ("2d_row", "1d", "none")},
}
AUTO_IMPL = {
    **{("cpu", variant): steps for variant, steps in _XLA_STEPS.items()},  # no kernels on CPU
    # GPU, `1d`, `2d_row`, `none`: the chunk kernel at every N (on a Hopper its Mosaic GPU bodies,
    # ChunkOptions.gpu_lowering), faster than the parallel-form kernel from the shortest N measured
    # (RESULTS.md, "The generic kernel with its chunk backward" and "Mosaic GPU bodies of the
    # generic kernel").
    **{("gpu", variant): ((None, "pallas"),) for variant in ("1d", "2d_row", "none")},
    # GPU, `2d`: the parallel-form kernel while it was measured fastest (N <= 1024), then the
    # parallel form inside 16-row blocks with column sweeps across them, faster forward+backward
    # from the next measured size on: 1.3x at N = 2304, 1.5x at 4096, 2.9x at 16384 (RESULTS.md,
    # "`2d` over blocks of rows").
    ("gpu", "2d"): ((2303, "pallas_parallel"), (None, "pallas_row_blocks")),
    # TPU: nothing has been timed on a TPU, and the Mosaic TPU kernels have only run in interpret
    # mode, so a default must not rest on them (impl="pallas" / "pallas_parallel" ask for them). The
    # CPU's choices between the XLA algorithms: a TPU's matrix units make the quadratic form's
    # matmuls cheaper against memory traffic than a CPU does, and `2d`'s `chunked` moves the w column
    # states through HBM every row (RESULTS.md, "`impl="auto"` from these runs").
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
    a Pallas kernel (which one depends on the variant and N); on CPU and
    TPU `parallel` at short N, else `chunked` (AUTO_IMPL). Without a variant only `impl` is checked
    and returned unchanged (how callers validate a config before the variant matters); with one,
    tokens is required.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto" or variant is None:
        return impl
    if tokens is None:
        raise ValueError("resolve_impl('auto', variant) needs tokens= (the sequence length h*w)")
    backend = kernel_backend.backend_name(jax.default_backend()) if backend is None else backend
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
        parallel-form GPU kernel, O(N^2 d): fastest at short sequences) or 'pallas_linear' (the
        linear-time exact kernel, '2d' only: docs/lasad.md §8) or 'pallas_row_blocks' (GPU, '2d' only:
        the parallel-form kernel inside blocks of rows, column sweeps across them: docs/lasad.md §9).
        'auto' is a fixed choice by
        backend, variant and N (AUTO_IMPL): a kernel on GPU; on CPU and TPU 'parallel' at short N,
        else 'chunked'.

    Returns:
      [batch, h*w, heads, dv] in q's dtype; computed with float32 states and accumulation.
    """
    h, w = common.check_grid(grid)
    impl = resolve_impl(impl, variant, tokens=h * w)
    if impl == "pallas":
        cells = chunk.chunk_cells(kernel_backend.default_backend("pallas"), False, BlockSizes(), ChunkOptions())
    elif impl == "pallas_parallel":
        cells = parallel_form.parallel_form_cells(kernel_backend.default_backend("pallas_parallel"), False,
                                                  ParallelBlocks())
    elif impl == "pallas_linear":
        cells = linear_2d.linear_cells(kernel_backend.default_backend("pallas_linear"), False, LinearBlocks())
    elif impl == "pallas_row_blocks":
        cells = row_blocks.row_block_cells(kernel_backend.default_backend("pallas_row_blocks"), False, RowBlocks())
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
    options: ChunkOptions = ChunkOptions(),
) -> jax.Array:
    """`lasad_attention` through the chunk kernel of an explicit backend: 'gpu' (Triton, or Mosaic
    GPU on a Hopper: `options.gpu_lowering`) or 'tpu' (Mosaic TPU), optionally in interpret mode
    (how the tests run the kernels on CPU). block_sizes: tiles; options: which algorithm each pass
    runs (kernels/chunk_config.py)."""
    cells = chunk.chunk_cells(backend, bool(interpret), block_sizes, options)
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
    """`lasad_attention` through the fused parallel-form kernel (kernels/parallel_form.py) of an explicit
    backend ('gpu': Triton, with `blocks`; 'tpu': Mosaic TPU, 128-token tiles), optionally in
    interpret mode (how the tests run it on CPU)."""
    cells = parallel_form.parallel_form_cells(backend, bool(interpret), blocks)
    return _attention(q, k, v, grid, variant, log_decay_row, log_decay_col, prefix_k, prefix_v, cells)


def lasad_attention_linear(
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
    blocks: LinearBlocks = LinearBlocks(),
) -> jax.Array:
    """`lasad_attention` through the linear-time `2d` kernel (kernels/linear_2d.py) of an explicit
    backend ('gpu': Triton, or Mosaic GPU on a Hopper with `blocks.gpu_body="mosaic"`; 'tpu':
    Mosaic TPU), optionally in interpret mode (how the tests run it on CPU; not the Mosaic GPU
    body). variant must be '2d'."""
    cells = linear_2d.linear_cells(backend, bool(interpret), blocks)
    return _attention(q, k, v, grid, variant, log_decay_row, log_decay_col, prefix_k, prefix_v, cells)


def lasad_attention_row_blocks(
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
    blocks: RowBlocks = RowBlocks(),
) -> jax.Array:
    """`lasad_attention` through `impl="pallas_row_blocks"` (kernels/row_blocks.py) with explicit
    tiles, on the GPU or in interpret mode (how the tests run it on CPU). variant must be '2d'."""
    cells = row_blocks.row_block_cells(backend, bool(interpret), blocks)
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
            out = out + common.prefix_term(q, prefix_k, prefix_v)
    return out.astype(q.dtype)


@functools.lru_cache(maxsize=None)
def chunked_with_block_size(block_tokens: int):
    """The chunked algorithm with a chosen block size (tests and benchmarks sweep it)."""
    return chunked.chunked_with_vjp(block_tokens)


# ----------------------------------------------------------------------------- decoding

DECODE_IMPLS = ("auto", "xla", "pallas")


def resolve_decode_impl(impl: str, backend: str | None = None, head_dims: tuple[int, int] | None = None) -> str:
    """The one place that maps a decode_impl to 'xla' or 'pallas'.

    'auto' is the fused kernel (kernels/decode.py) on GPU and TPU, the XLA step on CPU; on GPU only
    for head dims the Triton body tiles (powers of two >= 16; head_dims=(d, dv) when known), else
    'xla'. 'pallas' on CPU raises. backend defaults to jax's default backend.
    """
    if impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {impl!r}")
    backend = kernel_backend.backend_name(jax.default_backend()) if backend is None else backend
    if impl == "pallas" and backend not in kernel_backend.BACKENDS:
        raise ValueError(
            f"decode_impl='pallas' needs a GPU or TPU, but the backend is {backend!r}; use 'xla' or 'auto'")
    if impl != "auto":
        return impl
    if backend not in kernel_backend.BACKENDS:
        return "xla"
    if backend == "gpu" and head_dims is not None:
        try:
            decode_kernels.check_head_dims(backend, *head_dims)
        except ValueError:
            return "xla"
    return "pallas"


def decode(state: dict, q, k_prev, v_prev, cell, *, grid, variant, log_decay_row, log_decay_col,
           row_start: bool | None = None, impl: str = "auto"):
    """decode_step through `impl` (resolve_decode_impl): the same arguments and results."""
    impl = resolve_decode_impl(impl, head_dims=(q.shape[-1], v_prev.shape[-1]))
    kwargs = dict(grid=grid, variant=variant, log_decay_row=log_decay_row, log_decay_col=log_decay_col,
                  row_start=row_start)
    if impl == "xla":
        return decode_step(state, q, k_prev, v_prev, cell, **kwargs)
    backend = kernel_backend.backend_name(jax.default_backend())  # 'gpu' or 'tpu': resolved above
    return decode_kernels.decode_step(state, q, k_prev, v_prev, cell, **kwargs, backend=backend)
