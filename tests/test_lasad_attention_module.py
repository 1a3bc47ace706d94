"""The LASADAttention NNX block: parallel forward against decoding, algorithms against each other."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_error

from lasadgen_jax.models import LASADAttention
from lasadgen_jax.models.lasad_attention import initial_decays
from lasadgen_jax.ops import lasad

DIM, HEADS = 32, 2


def block(variant, impl="auto", seed=0, **kwargs):
    return LASADAttention(DIM, HEADS, variant=variant, impl=impl, rngs=nnx.Rngs(seed), **kwargs)


def decode_all(module, x, grid, num_prefix):
    """prefill + one decode_step per cell, under nnx.jit; returns [batch, P + N - 1, dim]."""
    state = module.init_decode_state(x.shape[0], grid=grid)
    prefix_out, state = nnx.jit(lambda m, x, s: m.prefill(x, s, grid=grid))(module, x[:, :num_prefix], state)
    step = nnx.jit(lambda m, x, s, cell: m.decode_step(x, s, cell, grid=grid))
    outputs = [prefix_out]
    for cell in range(1, grid[0] * grid[1]):
        out, state = step(module, x[:, num_prefix - 1 + cell], state, cell)
        outputs.append(out[:, None])
    return jnp.concatenate(outputs, axis=1)


@pytest.mark.parametrize("use_rope", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("num_prefix", [1, 3])
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_decoding_reproduces_parallel_forward(variant, num_prefix, use_rope):
    grid = (3, 5)
    module = block(variant, use_rope=use_rope)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, num_prefix + 15 - 1, DIM))
    parallel = module(x, grid=grid, num_prefix=num_prefix)
    chex.assert_shape(parallel, x.shape)
    assert rel_error(decode_all(module, x, grid, num_prefix), parallel) < 1e-5


@pytest.mark.parametrize("impl", ["recurrent", "scan", "chunked"])
@pytest.mark.parametrize("variant", ["2d", "1d"])
def test_every_impl_gives_the_reference_block_output(variant, impl):
    grid, num_prefix = (4, 3), 2
    x = jax.random.normal(jax.random.PRNGKey(2), (1, num_prefix + 12 - 1, DIM))
    expected = block(variant, "reference")(x, grid=grid, num_prefix=num_prefix)
    assert rel_error(block(variant, impl)(x, grid=grid, num_prefix=num_prefix), expected) < 1e-5


def test_the_op_reads_the_cell_values_as_the_projection_writes_them():
    """The LASAD op's value input is the v projection's matmul output (reshaped to heads), and its key
    and value inputs are not padded or sliced copies; odd grid, prefix of 2."""
    grid, num_prefix = (3, 5), 2
    graph, state = nnx.split(block("2d", "chunked"))
    x = jnp.ones((1, num_prefix + 15 - 1, DIM))
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graph, s)(x, grid=grid, num_prefix=num_prefix))(state, x).jaxpr
    producer = {out: eqn for eqn in jaxpr.eqns for out in eqn.outvars}

    def source(var):
        """The equation that computes var, looking through remat names."""
        eqn = producer[var]
        return source(eqn.invars[0]) if eqn.primitive.name == "name" else eqn

    (op,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "custom_vjp_call"]
    cell_inputs = [var for var in op.invars if getattr(var, "aval", None) is not None
                   and var.aval.shape == (1, 15, HEADS, DIM // HEADS)]
    assert len(cell_inputs) == 3   # q, k, v
    k_source, v_source = (source(var) for var in cell_inputs[1:])
    assert not [eqn for eqn in (k_source, v_source) if eqn.primitive.name in ("pad", "jit", "slice", "dynamic_slice")]
    assert v_source.primitive.name == "reshape" and producer[v_source.invars[0]].primitive.name == "dot_general"


def test_output_depends_only_on_earlier_positions():
    """Changing the input at position j leaves every output before j unchanged (causality)."""
    grid, num_prefix = (3, 4), 2
    module = block("2d")
    x = jax.random.normal(jax.random.PRNGKey(3), (1, num_prefix + 12 - 1, DIM))
    j = 7
    changed = x.at[:, j].add(5.0)
    before, after = module(x, grid=grid, num_prefix=num_prefix), module(changed, grid=grid, num_prefix=num_prefix)
    np.testing.assert_allclose(before[:, :j], after[:, :j], rtol=1e-6, atol=1e-6)
    assert not np.allclose(before[:, j:], after[:, j:])


def test_bfloat16_compute_with_float32_params():
    module = block("2d", dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 1 + 16 - 1, DIM)).astype(jnp.bfloat16)
    out = module(x, grid=(4, 4), num_prefix=1)
    chex.assert_type(out, jnp.bfloat16)
    chex.assert_tree_all_finite(out)
    params = nnx.state(module, nnx.Param)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_decays_start_in_range_and_gradients_reach_them():
    module = block("2d")
    log_row, log_col = module.log_decays()
    np.testing.assert_allclose(np.exp(log_row), initial_decays(HEADS, (0.5, 0.985)), rtol=1e-5)
    assert np.all(np.exp(log_col) < 1.0)
    x = jax.random.normal(jax.random.PRNGKey(5), (1, 1 + 12 - 1, DIM))
    grads = nnx.grad(lambda m: jnp.sum(m(x, grid=(3, 4), num_prefix=1) ** 2))(module)
    for name in ("decay_row_theta", "decay_col_theta", "out_norm_scale"):
        value = np.asarray(getattr(grads, name)[...])
        assert np.all(np.isfinite(value)) and np.any(value != 0), name


def test_variants_without_decays_have_no_decay_params():
    assert block("none").decay_row_theta is None and block("none").decay_col_theta is None
    assert block("1d").decay_row_theta is None and block("1d").decay_col_theta is not None


@pytest.mark.parametrize(
    "make, call, match",
    [
        (lambda: LASADAttention(30, 4, rngs=nnx.Rngs(0)), None, "not divisible by num_heads"),
        (lambda: LASADAttention(24, 4, rngs=nnx.Rngs(0)), None, "divisible by 4"),
        (lambda: block("3d"), None, "variant must be one of"),
        (lambda: block("2d", impl="fast"), None, "impl must be one of"),
        (lambda: block("2d", decay_range=(0.9, 0.5)), None, "decay_range"),
        (lambda: block("2d"), dict(shape=(1, 13, DIM), num_prefix=1), "needs num_prefix \\+ h\\*w - 1 = 12"),
        (lambda: block("2d"), dict(shape=(1, 11, DIM), num_prefix=0), "num_prefix must be >= 1"),
        (lambda: block("2d"), dict(shape=(1, 11, DIM + 1), num_prefix=1), "x must be"),
    ],
)
def test_bad_configuration_or_input_raises(make, call, match):
    with pytest.raises(ValueError, match=match):
        module = make()
        if call is not None:
            module(jnp.zeros(call["shape"]), grid=(3, 4), num_prefix=call["num_prefix"])
