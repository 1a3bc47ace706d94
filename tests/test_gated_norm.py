"""ops/gated_norm: the gated head norm's Pallas kernels (GPU body, interpret mode on the CPU) against its
reference, forward and every gradient, and how `impl` is chosen and checked."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasadgen_jax.ops import gated_norm
from lasadgen_jax.ops.gated_norm import GatedNormBlocks, gated_head_norm_pallas, gated_head_norm_reference

EPS = 1e-6


def make_inputs(shape, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], shape, dtype)
    gate = (2.0 * jax.random.normal(keys[1], shape)).astype(dtype)
    scale = 1.0 + 0.3 * jax.random.normal(keys[2], shape[-2:], jnp.float32)
    cotangent = jax.random.normal(keys[3], shape, dtype)
    return x, gate, scale, cotangent


def value_and_grads(norm, x, gate, scale, cotangent, out_dtype):
    def loss(x, gate, scale):
        out = norm(x, gate, scale, eps=EPS, out_dtype=out_dtype)
        assert out.shape == x.shape and out.dtype == out_dtype
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, gate, scale)


def rel(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


# token counts that do and do not fill the 16-token tiles; batch 1; one head; head dims 16 and 32
@pytest.mark.parametrize("shape", [(2, 37, 3, 16), (1, 16, 1, 32), (5, 4, 16)])
def test_kernels_match_the_reference_float32(shape):
    x, gate, scale, cotangent = make_inputs(shape, jnp.float32, seed=len(shape) + shape[0])
    kernel = lambda *a, **k: gated_head_norm_pallas(*a, **k, interpret=True, blocks=GatedNormBlocks(16))
    got_value, got = value_and_grads(kernel, x, gate, scale, cotangent, jnp.float32)
    want_value, want = value_and_grads(gated_head_norm_reference, x, gate, scale, cotangent, jnp.float32)
    assert abs(got_value - want_value) <= 1e-5 * abs(want_value)
    for name, a, b in zip(("dx", "dgate", "dscale"), got, want):
        assert a.dtype == b.dtype, name
        assert rel(a, b) < 2e-6, (name, rel(a, b))


def test_kernels_match_the_reference_bfloat16():
    """bf16 in and out (the block's case); 64-token tiles over 200 tokens, so the last is padded."""
    x, gate, scale, cotangent = make_inputs((2, 100, 4, 64), jnp.bfloat16, seed=3)
    kernel = lambda *a, **k: gated_head_norm_pallas(*a, **k, interpret=True)
    got_value, got = value_and_grads(kernel, x, gate, scale, cotangent, jnp.bfloat16)
    want_value, want = value_and_grads(gated_head_norm_reference, x, gate, scale, cotangent, jnp.bfloat16)
    assert abs(got_value - want_value) <= 1e-3 * abs(want_value)
    for name, a, b in zip(("dx", "dgate", "dscale"), got, want):
        assert a.dtype == b.dtype, name
        assert rel(a.astype(jnp.float32), b.astype(jnp.float32)) < 1e-2, (name, rel(a, b))


def test_a_zero_head_vector_gives_zero_output_and_finite_gradients():
    x, gate, scale, cotangent = make_inputs((1, 16, 2, 16), jnp.float32, seed=5)
    x = x.at[0, 3, 1].set(0.0)
    kernel = lambda *a, **k: gated_head_norm_pallas(*a, **k, interpret=True, blocks=GatedNormBlocks(16))
    out = kernel(x, gate, scale, eps=EPS)
    chex.assert_trees_all_equal(out[0, 3, 1], jnp.zeros(16))
    _, grads = value_and_grads(kernel, x, gate, scale, cotangent, jnp.float32)
    chex.assert_tree_all_finite(grads)


def test_forward_and_backward_lower_to_triton():
    """The two kernels pass Pallas's Triton lowering (jax.export for CUDA on the CPU) under jit and grad."""
    x, gate, scale, cotangent = make_inputs((4, 256, 16, 64), jnp.bfloat16, seed=7)
    norm = lambda x, gate, scale: gated_head_norm_pallas(x, gate, scale, eps=EPS)
    both = jax.jit(jax.value_and_grad(lambda x, g, s: jnp.sum(norm(x, g, s).astype(jnp.float32)), argnums=(0, 1, 2)))
    triton = "__gpu$xla.gpu.triton"
    module = jax.export.export(
        both, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)]
    )(x, gate, scale).mlir_module()
    assert module.count(f"@{triton}") == 2
    for name in ("gated_head_norm_forward", "gated_head_norm_backward"):
        assert f'name = "{name}"' in module, name


def test_auto_is_the_xla_form_and_names_are_kept():
    assert gated_norm.resolve_impl("auto") == "xla"
    assert gated_norm.resolve_impl("xla") == "xla" and gated_norm.resolve_impl("pallas") == "pallas"


def test_bad_input_is_refused_with_a_message():
    x, gate, scale, _ = make_inputs((1, 4, 2, 16), jnp.float32, seed=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        gated_norm.gated_head_norm(x, gate, scale, eps=EPS, impl="triton")
    with pytest.raises(ValueError, match="gate must have x's shape"):
        gated_norm.gated_head_norm(x, gate.reshape(1, 4, 32), scale, eps=EPS)
    with pytest.raises(ValueError, match="scale"):
        gated_norm.gated_head_norm(x, gate, scale[:1], eps=EPS)
    with pytest.raises(ValueError, match="runs on a GPU only"):
        gated_norm.gated_head_norm(x, gate, scale, eps=EPS, impl="pallas")
    with pytest.raises(ValueError, match="power of two >= 16, got 20"):
        gated_norm.resolve_impl("pallas", head_dim=20)
    x20 = jnp.ones((1, 4, 2, 20))
    with pytest.raises(ValueError, match="power of two >= 16, got 20"):
        gated_head_norm_pallas(x20, x20, jnp.ones((2, 20)), eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="block_tokens must be >= 16"):
        GatedNormBlocks(block_tokens=8)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        GatedNormBlocks(num_warps=3)


def test_the_model_refuses_a_bad_gated_norm_setting_when_built():
    from flax import nnx

    from lasadgen_jax.models.lasad_attention import LASADAttention
    from lasadgen_jax.models.lasadgen import model_config

    with pytest.raises(ValueError, match="gated norm impl must be one of"):
        model_config("B", gated_norm_impl="fused")
    with pytest.raises(ValueError, match="power of two >= 16, got 20"):
        LASADAttention(80, 4, gated_norm_impl="pallas", rngs=nnx.Rngs(0))


def test_the_block_with_the_kernels_has_the_xla_forms_loss_and_gradients(monkeypatch):
    """LASADAttention(gated_norm_impl="pallas") (kernels interpreted) against gated_norm_impl="xla": the
    block's output and every parameter's gradient, float32, grid 3x5 with a prefix of 2."""
    from flax import nnx

    from lasadgen_jax.models.lasad_attention import LASADAttention

    original, kernel_calls = gated_norm.gated_head_norm, []

    def interpreted(x, gate, scale, *, impl, **kwargs):
        if impl == "pallas":
            kernel_calls.append(x.shape)
            return gated_head_norm_pallas(x, gate, scale, interpret=True, blocks=GatedNormBlocks(16), **kwargs)
        return original(x, gate, scale, impl=impl, **kwargs)

    monkeypatch.setattr(gated_norm, "gated_head_norm", interpreted)
    x = jax.random.normal(jax.random.key(2), (2, 2 + 15 - 1, 64))

    def loss(model):
        return jnp.sum(model(x, grid=(3, 5), num_prefix=2) ** 2)

    make = lambda impl: LASADAttention(64, 4, impl="chunked", gated_norm_impl=impl, rngs=nnx.Rngs(0))
    want_loss, want = nnx.value_and_grad(loss)(make("xla"))
    got_loss, got = nnx.value_and_grad(loss)(make("pallas"))
    assert kernel_calls == [(2, 16, 4, 16)], kernel_calls
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss)
    want = dict(nnx.to_flat_state(want))
    for path, value in nnx.to_flat_state(got):
        assert rel(value[...], want[path][...]) < 1e-5, path


def test_xla_form_on_cpu_is_the_reference():
    x, gate, scale, _ = make_inputs((2, 5, 3, 8), jnp.float32, seed=1)
    chex.assert_trees_all_equal(gated_norm.gated_head_norm(x, gate, scale, eps=EPS),
                                gated_head_norm_reference(x, gate, scale, eps=EPS, out_dtype=jnp.float32))
