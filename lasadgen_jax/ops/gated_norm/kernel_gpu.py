"""The gated head norm as two Pallas kernels (GPU, Triton lowering): `impl="pallas"`.

    y = RMSNorm(x_head) * scale * SiLU(gate)        per token and head, in float32

Forward: one pass that reads x and the gate and writes y. Backward: one pass that reads x, the gate
and dy and writes dx, d gate and the per-program partial sums of d scale (summed after the call);
the per-head mean square is recomputed from x in both, never stored. In XLA the same arithmetic
is a reduction over each head's vector, then elementwise passes that read its inputs again.

Each program owns `block_tokens` tokens of one head: [block_tokens, e] tiles with e (the head dim)
a power of two; tokens are padded to a multiple of block_tokens (zero rows, whose outputs are
dropped and whose d scale terms are zero).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class GatedNormBlocks:
    """Tiles of the gated-head-norm kernels: tokens per program (a power of two >= 16) and Triton's
    num_warps."""

    block_tokens: int = 64
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_tokens", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"GatedNormBlocks.{name} must be a power of two, got {value!r}")
        if self.block_tokens < 16:
            raise ValueError(f"GatedNormBlocks.block_tokens must be >= 16, got {self.block_tokens}")


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _inverse_rms(x, eps):
    """1 / sqrt(mean(x^2) + eps) over the head dim: float32 [block_tokens, 1]."""
    return jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _forward_kernel(x_ref, gate_ref, scale_ref, out_ref, *, eps: float):
    x, gate = x_ref[...].astype(jnp.float32), gate_ref[...].astype(jnp.float32)
    scaled = x * _inverse_rms(x, eps) * scale_ref[...].astype(jnp.float32)[None, :]
    out_ref[...] = (scaled * gate * _sigmoid(gate)).astype(out_ref.dtype)


def _backward_kernel(x_ref, gate_ref, scale_ref, dy_ref, dx_ref, dgate_ref, dscale_ref, *, eps: float):
    x = x_ref[...].astype(jnp.float32)
    inverse_rms = _inverse_rms(x, eps)
    normed = x * inverse_rms
    scale = scale_ref[...].astype(jnp.float32)[None, :]
    gate = gate_ref[...].astype(jnp.float32)
    sigmoid = _sigmoid(gate)
    dy = dy_ref[...].astype(jnp.float32)
    d_scaled = dy * gate * sigmoid                        # d y / d (normed * scale)
    dgate_ref[...] = (dy * normed * scale * sigmoid * (1.0 + gate * (1.0 - sigmoid))).astype(dgate_ref.dtype)
    dscale_ref[...] = jnp.sum(d_scaled * normed, axis=0)
    d_normed = d_scaled * scale
    # RMSNorm's backward: dx = r (d_normed - normed mean(normed d_normed)), r the inverse RMS
    dx = inverse_rms * (d_normed - normed * jnp.mean(normed * d_normed, axis=-1, keepdims=True))
    dx_ref[...] = dx.astype(dx_ref.dtype)


def _as_rows(x, block_tokens: int):
    """[..., heads, e] -> [T, heads, e] with T padded to a multiple of block_tokens."""
    rows = x.reshape(-1, *x.shape[-2:])
    padding = -rows.shape[0] % block_tokens
    return jnp.pad(rows, ((0, padding), (0, 0), (0, 0))) if padding else rows


@functools.lru_cache(maxsize=None)
def gated_head_norm_kernels(eps: float, out_dtype: str, interpret: bool, blocks: GatedNormBlocks):
    """f(x [..., H, e], gate [..., H, e], scale [H, e]) -> [..., H, e] in out_dtype, with the kernels'
    backward (custom VJP)."""
    out_dtype = jnp.dtype(out_dtype)
    tile = blocks.block_tokens

    def specs(e):
        token_tile = pl.BlockSpec((tile, None, e), lambda t, h: (t, h, 0))
        head_row = pl.BlockSpec((None, e), lambda t, h: (h, 0))
        return token_tile, head_row

    def call(kernel, inputs, out_shape, in_specs, out_specs, name):
        tokens, heads, _ = inputs[0].shape
        return pl.pallas_call(
            functools.partial(kernel, eps=eps), out_shape=out_shape, grid=(tokens // tile, heads),
            in_specs=in_specs, out_specs=out_specs,
            compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
            interpret=interpret, name=name,
        )(*inputs)

    def forward(x, gate, scale):
        x_rows, gate_rows = _as_rows(x, tile), _as_rows(gate, tile)
        token_tile, head_row = specs(scale.shape[-1])
        out = call(_forward_kernel, (x_rows, gate_rows, scale), jax.ShapeDtypeStruct(x_rows.shape, out_dtype),
                   [token_tile, token_tile, head_row], token_tile, "gated_head_norm_forward")
        return out[: math.prod(x.shape[:-2])].reshape(x.shape)

    @jax.custom_vjp
    def gated_norm(x, gate, scale):
        return forward(x, gate, scale)

    def gated_norm_forward(x, gate, scale):
        return forward(x, gate, scale), (x, gate, scale)

    def gated_norm_backward(residuals, dy):
        x, gate, scale = residuals
        count = math.prod(x.shape[:-2])
        x_rows, gate_rows, dy_rows = (_as_rows(a, tile) for a in (x, gate, dy))
        heads, e = scale.shape
        token_tile, head_row = specs(e)
        partial_spec = pl.BlockSpec((None, None, e), lambda t, h: (t, h, 0))
        dx, dgate, dscale = call(
            _backward_kernel, (x_rows, gate_rows, scale, dy_rows),
            [jax.ShapeDtypeStruct(x_rows.shape, x.dtype), jax.ShapeDtypeStruct(gate_rows.shape, gate.dtype),
             jax.ShapeDtypeStruct((x_rows.shape[0] // tile, heads, e), jnp.float32)],
            [token_tile, token_tile, head_row, token_tile], [token_tile, token_tile, partial_spec],
            "gated_head_norm_backward",
        )
        return (dx[:count].reshape(x.shape), dgate[:count].reshape(gate.shape),
                jnp.sum(dscale, axis=0).astype(scale.dtype))

    gated_norm.defvjp(gated_norm_forward, gated_norm_backward)
    return gated_norm
