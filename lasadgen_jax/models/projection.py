"""The attention blocks' input projections (q, k, v and LASAD's gate) as one matmul."""

from __future__ import annotations

import jax.numpy as jnp


def project(x, layers, dtype):
    """x through bias-free nnx.Linear layers of one shape that share it, as one matmul.

    The kernels are stacked to [in, layers, out] and contracted with x at once: one gemm forward and
    one for x's gradient, where separate layers give one each plus a sum of their x gradients
    (benchmarks/RESULTS.md, "Training step: the LASAD block's own work"). Stacked on a new axis, not
    concatenated, so each kernel's sharding of its output features carries over unchanged. The
    parameters stay per layer. Returns one [..., out] array per layer, in dtype (as nnx.Linear).
    """
    kernels = [layer.kernel[...] for layer in layers]
    shapes = {kernel.shape for kernel in kernels}
    if any(layer.bias is not None for layer in layers) or len(shapes) != 1 or kernels[0].shape[0] != x.shape[-1]:
        raise ValueError(f"project takes bias-free layers of one kernel shape over x's {x.shape[-1]} features, "
                         f"got kernels {[kernel.shape for kernel in kernels]}")
    out = jnp.einsum("...i,ilo->...lo", x.astype(dtype), jnp.stack(kernels, axis=1).astype(dtype))
    return [out[..., index, :] for index in range(len(layers))]
