"""models/projection.py: one matmul over stacked kernels gives what the separate layers give."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import rel_error

from lasadgen_jax.models.projection import project


def linears(count, features_in, features_out, dtype, seed=0, use_bias=False):
    rngs = nnx.Rngs(seed)
    return tuple(nnx.Linear(features_in, features_out, use_bias=use_bias, dtype=dtype, rngs=rngs) for _ in range(count))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 24), (2, 5, 24)], ids=["batch1", "seq"])
def test_project_matches_separate_layers(shape, dtype, tol):
    graphdefs, params = zip(*(nnx.split(layer) for layer in linears(4, 24, 12, dtype)))
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    cotangents = [c.astype(dtype) for c in jax.random.normal(jax.random.PRNGKey(2), (4, *shape[:-1], 12))]
    merged = lambda params: [nnx.merge(graphdef, state) for graphdef, state in zip(graphdefs, params)]
    fused = lambda params, x: project(x, merged(params), dtype)
    separate = lambda params, x: [layer(x) for layer in merged(params)]
    results = []
    for fn in (fused, separate):
        outs, vjp = jax.vjp(fn, list(params), x)
        d_params, d_x = vjp(cotangents)
        results.append((outs, ([p["kernel"][...] for p in d_params], d_x)))
    (fused_out, (fused_dk, fused_dx)), (sep_out, (sep_dk, sep_dx)) = results
    for a, b in zip(fused_out + fused_dk + [fused_dx], sep_out + sep_dk + [sep_dx]):
        chex.assert_equal_shape([a, b])
        assert a.dtype == b.dtype
        assert rel_error(a, b) < tol


@pytest.mark.parametrize("layers,match", [
    (lambda: linears(2, 24, 12, jnp.float32, use_bias=True), "bias-free"),
    (lambda: linears(1, 24, 12, jnp.float32) + linears(1, 24, 8, jnp.float32), "one kernel shape"),
    (lambda: linears(2, 16, 12, jnp.float32), "x's 24 features"),
])
def test_project_refuses_layers_it_cannot_stack(layers, match):
    with pytest.raises(ValueError, match=match):
        project(jnp.ones((2, 24)), layers(), jnp.float32)
