"""Pieces shared by the LASAD algorithms: names, input checks, decay math and matmul dtypes.

The function every algorithm computes is written out in docs/lasad.md §1:

    o_a = sum_{m<a} D(a, m) (q_a . k_m) v_m  +  sum_p (q_a . k_p) v_p

with tokens on an h x w grid in raster order. `reference.py` spells D out on its own, so that the
oracle shares no decay code with the fast paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("2d", "2d_row", "1d", "none")
# Which per-head log decays each variant reads: (row, col).
USES_DECAY = {"2d": (True, True), "2d_row": (True, True), "1d": (False, True), "none": (False, False)}


# ----------------------------------------------------------------------------- input checks


def check_grid(grid) -> tuple[int, int]:
    """Returns grid as (h, w) python ints, or raises naming what is wrong."""
    try:
        h, w = grid
        h, w = int(h), int(w)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (h, w) of positive ints, got {grid!r}") from None
    if h < 1 or w < 1 or (h, w) != tuple(grid):
        raise ValueError(f"grid must be a pair (h, w) of positive ints, got {grid!r}")
    return h, w


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant


def check_qkv(q, k, v, grid) -> tuple[int, int, int, int, int]:
    """Checks q, k: [batch, h*w, heads, d] and v: [batch, h*w, heads, dv]; returns (B, N, H, d, dv)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, dim], got shape {getattr(x, 'shape', None)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q {q.shape} and k {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must match q in [batch, seq, heads], got q {q.shape} and v {v.shape}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    h, w = grid
    batch, seq, heads, d = q.shape
    if seq != h * w:
        raise ValueError(f"seq length {seq} of q/k/v does not match grid {h}x{w} = {h * w} tokens")
    return batch, seq, heads, d, v.shape[-1]


def check_prefix(prefix_k, prefix_v, batch: int, heads: int, d: int, dv: int, dtype):
    """Checks optional prefix keys [batch, P, heads, d] and values [batch, P, heads, dv]."""
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together (or both left None)")
    if prefix_k is None:
        return
    for name, x, last in (("prefix_k", prefix_k, d), ("prefix_v", prefix_v, dv)):
        if getattr(x, "ndim", None) != 4 or x.shape[0] != batch or x.shape[2] != heads or x.shape[3] != last:
            raise ValueError(
                f"{name} must have shape [batch={batch}, P, heads={heads}, {last}], "
                f"got {getattr(x, 'shape', None)}"
            )
        if x.dtype != dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from q/k/v dtype {dtype}")
    if prefix_k.shape[1] != prefix_v.shape[1]:
        raise ValueError(
            f"prefix_k and prefix_v must have the same prefix length, got {prefix_k.shape} and {prefix_v.shape}"
        )


def check_log_decays(variant: str, log_decay_row, log_decay_col, heads: int):
    """Returns (log_decay_row, log_decay_col) as float32 [heads] arrays (zeros where unused).

    A log decay must be <= 0 (decay in (0, 1]). Values are checked when they are concrete; inside
    jit they are tracers and cannot be inspected, so modules parameterise them to be negative.
    """
    out = []
    for name, value, used in zip(
        ("log_decay_row", "log_decay_col"), (log_decay_row, log_decay_col), USES_DECAY[variant]
    ):
        if not used:
            out.append(jnp.zeros((heads,), jnp.float32))  # ignored by this variant
            continue
        if value is None:
            raise ValueError(f"variant {variant!r} needs {name} (shape [heads={heads}]), got None")
        value = jnp.asarray(value)
        if value.shape != (heads,):
            raise ValueError(f"{name} must have shape [heads={heads}], got {value.shape}")
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {value.dtype}")
        if not isinstance(value, jax.core.Tracer):
            concrete = np.asarray(value)
            if np.any(np.isnan(concrete)) or np.any(concrete > 0):
                raise ValueError(
                    f"{name} must be <= 0 (a log decay; the decay is in (0, 1]), got {concrete}"
                )
        out.append(value.astype(jnp.float32))
    return tuple(out)


# ----------------------------------------------------------------------------- dtypes


def accumulation_dtype(dtype):
    """float32 for bf16/f16/f32 inputs, float64 for float64 inputs (tests under x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def mm(subscripts: str, a, b, dtype):
    """einsum with inputs rounded to `dtype` (the matmul input dtype) and float32 accumulation.

    XLA:CPU has no bf16 x bf16 -> f32 dot for every shape, so on CPU the rounded inputs are
    upcast again: bf16 products are exact in float32, so the result is the same.
    """
    acc = accumulation_dtype(dtype)
    if jnp.dtype(dtype).itemsize < 4 and jax.default_backend() == "cpu":
        a, b, dtype = a.astype(dtype), b.astype(dtype), acc
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None
    return jnp.einsum(
        subscripts, a.astype(dtype), b.astype(dtype), preferred_element_type=acc, precision=precision
    )


# ----------------------------------------------------------------------------- decay math


def pair_log_decay(variant: str, width: int, query_pos, key_pos, log_row, log_col):
    """(log D, d log D / d log g_row, d log D / d log g_col) for query tokens `query_pos` and key
    tokens `key_pos` (int32 raster indices that broadcast against each other, e.g. [n, 1] and
    [1, m]) on a grid of `width` columns; None where the variant does not depend on it.

    log_row, log_col broadcast against the pair shape (scalars in a kernel, [heads, 1, 1] outside).
    Valid where key < query; callers mask. Only position differences enter, so block-local
    positions give true decays as long as the block starts at a row boundary (chunked.py). Used
    by the chunked and parallel forms and inside the kernels of kernels/parallel_form.py.
    """
    if variant == "none":
        return None, None, None
    if variant == "1d":  # g^(a - m), g = exp(log_col)
        distance = (query_pos - key_pos).astype(jnp.float32)
        return log_col * distance, None, distance
    d_row = (jax.lax.div(query_pos, width) - jax.lax.div(key_pos, width)).astype(jnp.float32)
    d_col = (jax.lax.rem(query_pos, width) - jax.lax.rem(key_pos, width)).astype(jnp.float32)
    if variant == "2d":
        d_col = jnp.abs(d_col)
        return log_row * d_row + log_col * d_col, d_row, d_col
    if variant == "2d_row":
        same_row = d_row == 0.0
        by_row, by_col = jnp.where(same_row, 0.0, d_row), jnp.where(same_row, d_col, 0.0)
        return log_row * by_row + log_col * by_col, by_row, by_col
    raise ValueError(f"unknown variant {variant!r}")


def masked_decay(log_decay, causal):
    """exp(log_decay) where causal, else 0; the inner where keeps gradients free of inf * 0."""
    return jnp.where(causal, jnp.exp(jnp.where(causal, log_decay, 0.0)), 0.0)


def decayed_cumsum(x, log_decay, axis: int, reverse: bool = False):
    """y[i] = sum_{j <= i} exp(log_decay * (i - j)) x[j] along `axis` (j >= i when reverse).

    log_decay broadcasts against x with the scan axis dropped to size 1 (e.g. [heads, 1, 1] for
    x [..., axis, heads, d, dv]). Computed with an associative scan: log-depth, and only decays
    <= 1 are ever multiplied, so it cannot overflow.
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    decay = jnp.exp(log_decay) * jnp.ones([n if i == axis else 1 for i in range(x.ndim)], jnp.float32)

    def combine(left, right):
        decay_left, value_left = left
        decay_right, value_right = right
        return decay_left * decay_right, decay_right * value_left + value_right

    _, y = jax.lax.associative_scan(combine, (decay.astype(x.dtype), x), reverse=reverse, axis=axis)
    return y


def exclusive_decayed_cumsum(x, log_decay, axis: int):
    """y[i] = sum_{j < i} exp(log_decay * (i - j)) x[j]: the state a query at i reads."""
    inclusive = decayed_cumsum(x, log_decay, axis)
    shifted = jax.lax.slice_in_dim(inclusive, 0, x.shape[axis] - 1, axis=axis)
    pad = [(1, 0) if i == axis % x.ndim else (0, 0) for i in range(x.ndim)]
    return jnp.exp(log_decay).astype(x.dtype) * jnp.pad(shifted, pad)


def two_sided_smooth(x, log_decay, axis: int, head_axis: int):
    """y[i] = sum_j exp(log_decay * |i - j|) x[j] along `axis`: the row fold of the `2d` variant.

    log_decay: [heads], matching x's `head_axis`. Done as one matmul with the n x n decay matrix of
    each head: n^2 multiply-adds per row position, all on the matrix units, and every weight <= 1.
    """
    axis, head_axis = axis % x.ndim, head_axis % x.ndim
    position = jnp.arange(x.shape[axis])
    weights = jnp.exp(log_decay[:, None, None] * jnp.abs(position[:, None] - position[None, :]))
    letters = "abcdefghijklmnopqrstuv"[: x.ndim]
    out_letters = letters[:axis] + "z" + letters[axis + 1 :]
    spec = f"{letters[head_axis]}z{letters[axis]},{letters}->{out_letters}"
    return jnp.einsum(spec, weights.astype(x.dtype), x, precision=jax.lax.Precision.HIGHEST)


def prefix_term(q, prefix_k, prefix_v):
    """sum_p (q_a . k_p) v_p: the undecayed prefix part of every output, [batch, N, heads, dv] float32.

    Broadcasts and sums over the few prefix positions, not a matmul with the [d, dv] prefix state:
    XLA fuses them into the elementwise work around the op, where the state form is a batched matmul
    with a transpose on either side, forward and backward (benchmarks/RESULTS.md, "Training step:
    the LASAD block's own work").
    """
    f32 = jnp.float32
    scores = jnp.sum(q.astype(f32)[:, :, None] * prefix_k.astype(f32)[:, None], axis=-1)  # [B, N, P, H]
    return jnp.sum(scores[..., None] * prefix_v.astype(f32)[:, None], axis=2)


def prefix_state(prefix_k, prefix_v):
    """sum_p k_p v_p^T per batch and head: [batch, heads, d, dv] in float32 (prefix keys are not decayed)."""
    return mm("bphd,bphe->bhde", prefix_k, prefix_v, prefix_k.dtype)
