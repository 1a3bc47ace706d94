"""The fused LASAD decode step: one Pallas launch per attention layer and token (docs/lasad.md §2).

One program per (batch, head) folds the key/value of cell-1 into its state, reads the state with
the query of `cell`, and writes back only what changed; every state array is read once. The state
layout is recurrent.py's (the XLA `decode_step` there is the reference this kernel is tested
against), stored in float32 or bfloat16 and updated in float32:

    variant  in a row: reads                  writes           at a row start: reads / writes
    none/1d  state, prefix                    state            (the same)
    2d_row   vertical, row_sum, row, prefix   row_sum, row     vertical, row_sum, row / all three
    2d       columns[c], row_k, row_v, prefix row_k[c-1], row_v[c-1]
                                                               columns, row_k, row_v / columns

where `prefix` is the prefix matrix or, in a state made for a short prefix, its key/value slots.

Inputs arrive as [B, H, d, 1] columns and [B, H, 1, d] rows, so that every tile is 2-D and outer
products and reads are broadcasts, no transposes. The `2d` row fold (once per row) is one
[S, d]^T x [S, dv] matmul per column, in the query's dtype with float32 accumulation.

GPU body: Triton (`jax.experimental.pallas.triton`), head dims powers of two >= 16 (tile sizes
and tl.dot's minimum); the row slots of a step in a row are loaded under a mask, so a step reads
only the slots before its column. TPU body: Mosaic TPU, the decays and the cell in SMEM, whole
per-(batch, head) blocks in VMEM. Both run in interpret mode on CPU (tests/test_lasad_decode.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from lasadgen_jax.ops.lasad import common, recurrent
from lasadgen_jax.ops.lasad.kernels.backend import BACKENDS

# What each variant's step reads (besides q, k, v) and writes, by state key; a row start may differ.
_READS = {
    "none": ("state",),
    "1d": ("state",),
    "2d_row": ("vertical", "row_sum", "row"),
    "2d": ("columns", "row_k", "row_v"),
}
PREFIX_FORMS = (("prefix",), ("prefix_k", "prefix_v"))  # a matrix, or key/value slots


def read_keys(variant: str, state: dict) -> tuple[str, ...]:
    """The state arrays a step reads, in the kernel's order: the variant's, then the prefix's."""
    prefix = next((form for form in PREFIX_FORMS if set(form) <= set(state)), None)
    if prefix is None or set(state) != set(_READS[variant]) | set(prefix):
        raise ValueError(f"state for variant {variant!r} must hold {sorted(_READS[variant])} and either 'prefix' or "
                         f"'prefix_k' and 'prefix_v', got {sorted(state)}")
    return _READS[variant] + prefix
_WRITES = {"none": ("state",), "1d": ("state",), "2d_row": ("row_sum", "row")}
_WRITES_AT_ROW_START = {"2d_row": ("vertical", "row_sum", "row"), "2d": ("columns",)}


def written_keys(variant: str, row_start: bool) -> tuple[str, ...]:
    """The state arrays a step writes (in this order after the output)."""
    if variant == "2d":
        return ("columns",) if row_start else ("row_k", "row_v")
    return _WRITES_AT_ROW_START.get(variant, _WRITES[variant]) if row_start else _WRITES[variant]


# ----------------------------------------------------------------------------- the kernel


@dataclasses.dataclass(frozen=True)
class _Setting:
    """What a kernel is compiled for: backend, variant, grid width, row start or not, matmul input dtype."""

    backend: str
    variant: str
    width: int
    row_start: bool
    matmul_dtype: jnp.dtype


def _scalars(setting, cell_ref, decay_ref):
    """(cell, log_row, log_col): on GPU from per-program blocks, on TPU from SMEM by head."""
    if setting.backend == "gpu":
        return cell_ref[0], decay_ref[0], decay_ref[1]
    head = pl.program_id(1)
    return cell_ref[0], decay_ref[head, 0], decay_ref[head, 1]


def _read(q_col, matrix):
    """q^T S as a [1, dv] row: q_col [d, 1], matrix [d, dv], both float32."""
    return jnp.sum(q_col * matrix, axis=0, keepdims=True)


def _load_slots(setting, ref, count):
    """The first `count` (traced) rows of a [S, dim] slot ref in float32, zero past them. The GPU body
    fetches only those rows (a masked load); the TPU body loads the tile and selects."""
    slots = ref.shape[0]
    valid = jax.lax.broadcasted_iota(jnp.int32, (slots, 1), 0) < count
    if setting.backend == "gpu":
        loaded = pltriton.load(ref, mask=jnp.broadcast_to(valid, ref.shape), other=0.0)
    else:
        loaded = ref[...]
    return jnp.where(valid, loaded.astype(jnp.float32), 0.0)


def _fold_dot(setting, weighted_k, row_v):
    """weighted_k^T row_v: [S, d]^T x [S, dv] -> [d, dv] float32, inputs in the matmul dtype."""
    a, b = weighted_k.astype(setting.matmul_dtype), row_v.astype(setting.matmul_dtype)
    exact = jnp.dtype(setting.matmul_dtype).itemsize >= 4
    if setting.backend == "gpu":
        precision = jax.lax.Precision.HIGHEST if exact else None
        return pltriton.dot(a, b, trans_a=True, precision=precision).astype(jnp.float32)
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                               precision=jax.lax.Precision.HIGHEST if exact else None)


def _kernel(cell_ref, decay_ref, q_col_ref, q_row_ref, k_col_ref, k_row_ref, v_ref, *refs, setting: _Setting,
            reads: tuple[str, ...]):
    variant = setting.variant
    state = dict(zip(reads, refs[: len(reads)]))
    out_ref, *written = refs[len(reads):]
    written = dict(zip(written_keys(variant, setting.row_start), written))
    cell, log_row, log_col = _scalars(setting, cell_ref, decay_ref)
    f32 = lambda ref: ref[...].astype(jnp.float32)
    live = (cell > 0).astype(jnp.float32)  # at cell 0 there is no previous token to fold
    q_col, q_row = f32(q_col_ref), f32(q_row_ref)
    k_col, k_row, v_row = f32(k_col_ref) * live, f32(k_row_ref) * live, f32(v_ref) * live
    g_row, g_col = jnp.exp(log_row), jnp.exp(log_col)
    store = lambda key, value: written[key].__setitem__(Ellipsis, value.astype(written[key].dtype))

    if variant in ("none", "1d"):
        new = f32(state["state"]) + k_col * v_row
        new = g_col * new if variant == "1d" else new
        store("state", new)
        out = _read(q_col, new)
    elif variant == "2d_row":
        kv = k_col * v_row
        if setting.row_start:  # cell-1 ended its row: the finished row moves into the vertical state
            vertical = g_row * (f32(state["vertical"]) + f32(state["row_sum"]) + kv)
            zeros = jnp.zeros(kv.shape, jnp.float32)
            store("vertical", vertical)
            store("row_sum", zeros)
            store("row", zeros)
            out = _read(q_col, vertical)
        else:
            row = g_col * (f32(state["row"]) + kv)
            store("row_sum", f32(state["row_sum"]) + kv)
            store("row", row)
            out = _read(q_col, f32(state["vertical"])) + _read(q_col, row)
    else:
        out = _2d_step(setting, state, written, cell, log_col, g_row, q_col, q_row, k_row, v_row)
    if "prefix" in state:
        out_ref[...] = out + _read(q_col, f32(state["prefix"]))
    else:  # sum_p (q . k_p) v_p; the slots past the prefix are zero
        scores = jnp.sum(f32(state["prefix_k"]) * q_row, axis=1, keepdims=True)
        out_ref[...] = out + jnp.sum(scores * f32(state["prefix_v"]), axis=0, keepdims=True)


def _2d_step(setting, state, written, cell, log_col, g_row, q_col, q_row, k_row, v_row):
    """The `2d` step; returns the read without the prefix, [1, dv] float32."""
    w = setting.width
    col = cell % w
    slots = state["row_k"].shape[0]
    slot = jax.lax.broadcasted_iota(jnp.int32, (slots, 1), 0)
    previous = w - 1 if setting.row_start else col - 1  # the slot of cell-1
    row_k = jnp.where(slot == previous, k_row, _load_slots(setting, state["row_k"], previous))
    row_v = jnp.where(slot == previous, v_row, _load_slots(setting, state["row_v"], previous))
    if not setting.row_start:
        written["row_k"][pl.ds(previous, 1), :] = k_row.astype(written["row_k"].dtype)
        written["row_v"][pl.ds(previous, 1), :] = v_row.astype(written["row_v"].dtype)
        weights = jnp.where(slot < col, jnp.exp(log_col * (col - slot).astype(jnp.float32)), 0.0)  # [S, 1]
        scores = jnp.sum(row_k * q_row, axis=1, keepdims=True)  # [S, 1]
        row_part = jnp.sum(scores * weights * row_v, axis=0, keepdims=True)
        return _read(q_col, state["columns"][col].astype(jnp.float32)) + row_part

    columns_in, columns_out = state["columns"], written["columns"]

    def fold_column(c):  # C[c] <- g_row (C[c] + sum_c' g_col^|c - c'| k_c' v_c'^T)
        distance = jnp.abs(c - slot).astype(jnp.float32)
        weights = jnp.where(slot < w, jnp.exp(log_col * distance), 0.0)
        new = g_row * (columns_in[c].astype(jnp.float32) + _fold_dot(setting, weights * row_k, row_v))
        columns_out[c] = new.astype(columns_out.dtype)
        return new

    first = fold_column(0)  # a row start reads column 0

    def fold(c, carry):
        fold_column(c)
        return carry

    jax.lax.fori_loop(1, w, fold, 0)
    return _read(q_col, first)


# ----------------------------------------------------------------------------- the pallas_call


def check_head_dims(backend: str, d: int, dv: int):
    """The GPU body tiles whole head dims: powers of two >= 16 (the TPU body takes any)."""
    if backend == "gpu":
        for name, size in (("d", d), ("dv", dv)):
            if size < 16 or size & (size - 1):
                raise ValueError(f"the fused decode step on GPU needs head dims that are powers of two >= 16, "
                                 f"got {name}={size}; use decode_impl='xla'")


def _call(state, q, k_prev, v_prev, cell, decays, *, setting: _Setting, interpret: bool):
    batch, heads, _ = q.shape
    dv = v_prev.shape[-1]
    variant = setting.variant
    reads = read_keys(variant, state)
    writes = written_keys(variant, setting.row_start)
    block = lambda array: pl.BlockSpec((None, None, *array.shape[2:]),
                                       lambda b, h: (b, h) + (0,) * (len(array.shape) - 2))
    as_col = lambda x: x[..., None]
    as_row = lambda x: x[..., None, :]
    vectors = [as_col(q), as_row(q), as_col(k_prev), as_row(k_prev), as_row(v_prev)]
    cell = jnp.asarray(cell, jnp.int32).reshape(1)
    if setting.backend == "gpu":
        scalar_specs = [pl.BlockSpec((1,), lambda b, h: (0,)), pl.BlockSpec((None, 2), lambda b, h: (h, 0))]
        params = pltriton.CompilerParams(num_warps=4, num_stages=1)
    else:
        scalar_specs = [pl.BlockSpec(memory_space=pltpu.SMEM)] * 2
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    inputs = [cell, decays, *vectors, *(state[key] for key in reads)]
    out_shape = [jax.ShapeDtypeStruct((batch, heads, 1, dv), jnp.float32)]
    out_shape += [jax.ShapeDtypeStruct(state[key].shape, state[key].dtype) for key in writes]
    first_state = 2 + len(vectors)
    outputs = pl.pallas_call(
        functools.partial(_kernel, setting=setting, reads=reads),
        out_shape=out_shape,
        grid=(batch, heads),
        in_specs=scalar_specs + [block(x) for x in inputs[2:]],
        out_specs=[block(shape) for shape in out_shape],
        input_output_aliases={first_state + reads.index(key): 1 + i for i, key in enumerate(writes)},
        compiler_params=params,
        interpret=interpret,
        name=f"lasad_decode_{variant}{'_row_start' if setting.row_start else ''}",
    )(*inputs)
    return outputs[0][:, :, 0], {**state, **dict(zip(writes, outputs[1:]))}


def decode_step(state: dict, q, k_prev, v_prev, cell, *, grid, variant, log_decay_row, log_decay_col,
                row_start: bool | None = None, backend: str, interpret: bool = False):
    """recurrent.decode_step as one fused Pallas launch on `backend` ('gpu' or 'tpu'); same arguments,
    same results (output [batch, heads, dv] float32, new state). row_start None: a lax.cond between
    the row-start and the in-row kernels."""
    _, w = common.check_grid(grid)
    common.check_variant(variant)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    read_keys(variant, state)
    if q.ndim != 3 or k_prev.shape != q.shape or v_prev.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k_prev must be [batch, heads, d] and v_prev [batch, heads, dv], got {q.shape}, "
                         f"{k_prev.shape}, {v_prev.shape}")
    _, heads, d = q.shape
    check_head_dims(backend, d, v_prev.shape[-1])
    if variant == "2d" and state["row_k"].shape[2] != recurrent.row_slots(w):
        raise ValueError(f"state row_k has {state['row_k'].shape[2]} slots, grid width {w} needs "
                         f"{recurrent.row_slots(w)}")
    log_decay_row, log_decay_col = common.check_log_decays(variant, log_decay_row, log_decay_col, heads)
    decays = jnp.stack([log_decay_row, log_decay_col], axis=1)
    call = lambda row_start_now: lambda s: _call(
        s, q, k_prev, v_prev, cell, decays, interpret=interpret,
        setting=_Setting(backend, variant, w, row_start_now, jnp.dtype(q.dtype)),
    )
    if variant in ("none", "1d"):
        return call(False)(state)
    if row_start is None:
        return jax.lax.cond(jnp.asarray(cell) % w == 0, call(True), call(False), state)
    return call(bool(row_start))(state)
