"""The gated head norm in plain jnp: what every other algorithm of this op is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gated_head_norm_reference(x, gate, scale, *, eps: float, out_dtype):
    """RMSNorm of each head's vector, times `scale`, times SiLU(gate), in float32.

    x, gate: [..., heads, e]; scale: [heads, e]. Returns [..., heads, e] in out_dtype.
    """
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    normed = normed * scale.astype(jnp.float32)
    return (normed * jax.nn.silu(gate.astype(jnp.float32))).astype(out_dtype)
