"""The LASAD op: every algorithm and every gradient against the quadratic reference."""

from __future__ import annotations

import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, make_inputs, rel_error

from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad import lasad_attention

FAST_IMPLS = ("recurrent", "scan", "chunked", "parallel")
CASES = [
    Case("grid3x7_prefix2", batch=2, grid=(3, 7), heads=2, d=8, dv=6, prefix=2),
    Case("grid12x20_batch1", batch=1, grid=(12, 20), heads=2, d=8, dv=8, prefix=0),
    Case("row1x9_prefix1", batch=1, grid=(1, 9), heads=3, d=4, dv=4, prefix=1),
    Case("column9x1", batch=2, grid=(9, 1), heads=1, d=4, dv=6, prefix=0),
    Case("grid4x4_d60_prefix3", batch=1, grid=(4, 4), heads=1, d=60, dv=60, prefix=3),
]
CASE_BY_NAME = {case.name: case for case in CASES}
DIFF_ARGS = ("q", "k", "v", "log_decay_row", "log_decay_col", "prefix_k", "prefix_v")


@functools.cache
def jitted_op(grid, variant, impl):
    return jax.jit(functools.partial(lasad_attention, grid=grid, variant=variant, impl=impl))


@functools.cache
def jitted_grads(grid, variant, impl):
    """Gradients of sum(cotangent * lasad_attention(...)) with respect to every array input."""

    def loss(diff, cotangent):
        out = lasad_attention(**diff, grid=grid, variant=variant, impl=impl)
        return jnp.sum(cotangent.astype(jnp.float32) * out.astype(jnp.float32))

    return jax.jit(jax.grad(loss))


def check_grads(case, variant, impl, dtype, tolerance, seed, log_decay_range=(-1.0, -0.05)):
    inputs = make_inputs(case, seed=seed, dtype=dtype, log_decay_range=log_decay_range)
    cotangent = jax.random.normal(jax.random.PRNGKey(seed + 1000), inputs["v"].shape).astype(dtype)
    expected = jitted_grads(case.grid, variant, "reference")(inputs, cotangent)
    actual = jitted_grads(case.grid, variant, impl)(inputs, cotangent)
    used_row, used_col = lasad.common.USES_DECAY[variant]
    for name in DIFF_ARGS:
        if inputs[name] is None:
            continue
        chex.assert_equal_shape([actual[name], inputs[name]])
        chex.assert_type(actual[name], inputs[name].dtype)
        if (name == "log_decay_row" and not used_row) or (name == "log_decay_col" and not used_col):
            np.testing.assert_array_equal(actual[name], 0.0, err_msg=f"{name} is unused by {variant}")
            continue
        error = rel_error(actual[name], expected[name])
        assert error < tolerance, f"d{name}: relative error {error:.2e} >= {tolerance}"


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_forward_float32_matches_reference(variant, impl, case):
    inputs = make_inputs(case, seed=zlib.crc32(f"{variant}/{impl}/{case}".encode()) % 2**16)
    expected = jitted_op(case.grid, variant, "reference")(**inputs)
    actual = jitted_op(case.grid, variant, impl)(**inputs)
    chex.assert_shape(actual, (case.batch, case.grid[0] * case.grid[1], case.heads, case.dv))
    chex.assert_type(actual, jnp.float32)
    assert rel_error(actual, expected) < 1e-5


@pytest.mark.parametrize("case_name", ["grid3x7_prefix2", "column9x1", "grid12x20_batch1"])
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_forward_bfloat16_matches_reference(variant, impl, case_name):
    case = CASE_BY_NAME[case_name]
    inputs = make_inputs(case, seed=7, dtype=jnp.bfloat16)
    expected = jitted_op(case.grid, variant, "reference")(**inputs)
    actual = jitted_op(case.grid, variant, impl)(**inputs)
    chex.assert_type(actual, jnp.bfloat16)
    assert rel_error(actual, expected) < 2e-2


# What impl="auto" must resolve to (docs/lasad.md §6; benchmarks/RESULTS.md, "`impl="auto"` from
# these runs"), by backend, variant and sequence length: written out here, not read from AUTO_IMPL,
# so that a change of the table is a visible change of this test.
AUTO_EXPECTED = {
    "cpu": {
        "2d": {1: "parallel", 64: "parallel", 256: "parallel", 576: "parallel", 577: "chunked", 4096: "chunked"},
        **{variant: {1: "parallel", 64: "parallel", 65: "chunked", 256: "chunked", 4096: "chunked"}
           for variant in ("2d_row", "1d", "none")},
    },
    "gpu": {
        "2d": {1: "pallas_parallel", 256: "pallas_parallel", 576: "pallas_parallel", 1024: "pallas_parallel",
               2303: "pallas_parallel", 2304: "pallas_row_blocks", 4096: "pallas_row_blocks",
               16384: "pallas_row_blocks", 65536: "pallas_row_blocks"},
        **{variant: {1: "pallas", 256: "pallas", 576: "pallas", 16384: "pallas", 65536: "pallas"}
           for variant in ("1d", "2d_row", "none")},
    },
    "tpu": {  # the CPU's choices between the XLA algorithms (no TPU timings; AUTO_IMPL says why)
        "2d": {1: "parallel", 256: "parallel", 576: "parallel", 577: "chunked", 16384: "chunked"},
        **{variant: {1: "parallel", 64: "parallel", 65: "chunked", 4096: "chunked", 16384: "chunked"}
           for variant in ("2d_row", "1d", "none")},
    },
}


@pytest.mark.parametrize("variant", lasad.VARIANTS)
@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_auto_resolves_by_backend_variant_and_length(backend, variant):
    for tokens, expected in AUTO_EXPECTED[backend][variant].items():
        assert lasad.auto_impl(backend, variant, tokens) == expected, tokens
        assert lasad.resolve_impl("auto", variant, backend, tokens=tokens) == expected, tokens


@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_auto_resolves_on_this_cpu_by_length(variant):
    assert jax.default_backend() == "cpu"
    assert lasad.resolve_impl("auto", variant, tokens=64) == "parallel"
    assert lasad.resolve_impl("auto", variant, tokens=4096) == "chunked"


def test_auto_needs_the_sequence_length():
    with pytest.raises(ValueError, match="tokens"):
        lasad.resolve_impl("auto", "2d", "gpu")
    with pytest.raises(ValueError, match="sequence length"):
        lasad.auto_impl("gpu", "2d", 0)


def test_explicit_impl_is_never_replaced():
    for impl in lasad.IMPLS:
        if impl != "auto":
            assert lasad.resolve_impl(impl, "2d", "gpu", tokens=256) == impl
    assert lasad.resolve_impl("auto") == "auto"  # no variant: only checked


def test_auto_on_an_unknown_backend_raises():
    with pytest.raises(ValueError, match="knows the backends"):
        lasad.auto_impl("metal", "2d", 256)
    with pytest.raises(ValueError, match="variant"):
        lasad.auto_impl("gpu", "3d", 256)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case_name", ["grid3x7_prefix2", "row1x9_prefix1", "column9x1"])
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_gradients_float32_match_reference(variant, impl, case_name):
    check_grads(CASE_BY_NAME[case_name], variant, impl, jnp.float32, tolerance=1e-5, seed=3)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_gradients_bfloat16_match_reference(variant, impl):
    check_grads(CASE_BY_NAME["grid3x7_prefix2"], variant, impl, jnp.bfloat16, tolerance=2e-2, seed=5)


@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_gradients_on_a_larger_grid(variant):
    check_grads(CASE_BY_NAME["grid12x20_batch1"], variant, "chunked", jnp.float32, tolerance=1e-5, seed=11)


@pytest.mark.parametrize("variant", ["1d", "2d_row", "none"])
def test_chunked_chunk_backward_over_many_chunks(variant):
    """`chunked`'s chunk backward over 5-8 chunks of 64 slots, decays weak enough that pairs several
    chunks apart count in every gradient."""
    case = Case("grid8x60_prefix1", batch=1, grid=(8, 60), heads=2, d=8, dv=8, prefix=1)
    check_grads(case, variant, "chunked", jnp.float32, tolerance=1e-5, seed=17, log_decay_range=(-0.08, -0.01))


def test_chunked_backward_keeps_float64():
    """float64 inputs take the recomputation backward (the chunk backward's arithmetic is float32)
    and keep their dtype. `chunked` itself is float32-accurate in float64 (its forward is ~4e-8 off
    the reference here), so the bound is float32's."""
    case = Case("grid2x40", batch=1, grid=(2, 40), heads=1, d=4, dv=4, prefix=0)
    with jax.enable_x64(True):
        inputs = make_inputs(case, seed=19, dtype=jnp.float64)
        inputs = {name: None if x is None else x.astype(jnp.float64) for name, x in inputs.items()}
        cotangent = jax.random.normal(jax.random.PRNGKey(20), inputs["v"].shape, jnp.float64)
        grads = {impl: jax.grad(lambda x, impl=impl: jnp.sum(cotangent * lasad.lasad_attention(
            **x, grid=case.grid, variant="1d", impl=impl)))(inputs) for impl in ("reference", "chunked")}
        for name in ("q", "k", "v", "log_decay_col"):  # 80 tokens: two chunks of the chunk backward
            assert grads["chunked"][name].dtype == jnp.float64
            assert rel_error(grads["chunked"][name], grads["reference"][name]) < 1e-6, name


# ----------------------------------------------------------------------------- chunked blocks


@pytest.mark.parametrize("block_tokens", [1, 6, 7, 20, 1000])
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_chunked_any_block_size(variant, block_tokens):
    """Blocks of 1 token/row, blocks that do not divide h or N, and one block for everything."""
    case = Case("grid5x7", batch=1, grid=(5, 7), heads=2, d=4, dv=4, prefix=0)
    inputs = make_inputs(case, seed=block_tokens)
    expected = jitted_op(case.grid, variant, "reference")(**inputs)
    decays = lasad.common.check_log_decays(variant, inputs["log_decay_row"], inputs["log_decay_col"], case.heads)
    cells = lasad.chunked_with_block_size(block_tokens)
    actual = jax.jit(cells, static_argnums=(5, 6))(inputs["q"], inputs["k"], inputs["v"], *decays, case.grid, variant)
    assert rel_error(actual, expected) < 1e-5


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("prefix", [0, 2])
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_decode_steps_reproduce_parallel_output(variant, prefix):
    case = Case("grid3x5", batch=2, grid=(3, 5), heads=2, d=8, dv=4, prefix=prefix)
    inputs = make_inputs(case, seed=13)
    expected = jitted_op(case.grid, variant, "reference")(**inputs)
    state = lasad.init_state(case.batch, case.heads, case.d, case.dv, grid=case.grid, variant=variant)
    if prefix:
        state = lasad.fold_prefix(state, inputs["prefix_k"], inputs["prefix_v"])
    step = jax.jit(
        functools.partial(
            lasad.decode_step, grid=case.grid, variant=variant,
            log_decay_row=inputs["log_decay_row"], log_decay_col=inputs["log_decay_col"],
        )
    )
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    outputs = []
    for cell in range(q.shape[1]):
        previous = max(cell - 1, 0)  # ignored at cell 0
        out, state = step(state, q[:, cell], k[:, previous], v[:, previous], cell)
        outputs.append(out)
    assert rel_error(jnp.stack(outputs, axis=1), expected) < 1e-5


@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_decode_state_size_does_not_grow_with_rows(variant):
    size = lambda grid: sum(
        x.size for x in jax.tree.leaves(lasad.init_state(1, 2, 8, 8, grid=grid, variant=variant))
    )
    assert size((4, 16)) == size((64, 16)), "state must not depend on the number of rows"
    if variant == "2d":  # w column states + the current row: grows with w only
        assert size((4, 32)) > size((4, 16))
    else:
        assert size((4, 32)) == size((4, 16))


# ----------------------------------------------------------------------------- extremes


@pytest.mark.parametrize("log_decay", [-30.0, -1e-6], ids=["decay_near_0", "decay_near_1"])
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("variant", ["2d", "2d_row", "1d"])
def test_extreme_decays_stay_finite_and_correct(variant, impl, log_decay):
    case = Case("grid6x5", batch=1, grid=(6, 5), heads=2, d=4, dv=4, prefix=1)
    inputs = make_inputs(case, seed=17)
    inputs["log_decay_row"] = jnp.full((case.heads,), log_decay)
    inputs["log_decay_col"] = jnp.full((case.heads,), log_decay)
    expected = jitted_op(case.grid, variant, "reference")(**inputs)
    actual = jitted_op(case.grid, variant, impl)(**inputs)
    assert rel_error(actual, expected) < 1e-5
    cotangent = jnp.ones_like(inputs["v"])
    grads = jitted_grads(case.grid, variant, impl)(inputs, cotangent)
    for name, grad in grads.items():
        if grad is not None:
            assert np.all(np.isfinite(np.asarray(grad))), f"d{name} not finite"


@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_long_grid_chunked_matches_recurrent(variant):
    case = Case("grid64x64", batch=1, grid=(64, 64), heads=2, d=8, dv=8, prefix=0)
    inputs = make_inputs(case, seed=19, log_decay_range=(-0.3, -0.005))
    recurrent = jitted_op(case.grid, variant, "recurrent")(**inputs)
    chunked = jitted_op(case.grid, variant, "chunked")(**inputs)
    assert np.all(np.isfinite(np.asarray(chunked)))
    assert rel_error(chunked, recurrent) < 1e-5


def test_traced_log_decays_under_jit():
    case = CASE_BY_NAME["grid3x7_prefix2"]
    inputs = make_inputs(case, seed=23)
    expected = jitted_op(case.grid, "2d", "reference")(**inputs)
    actual = jax.jit(lambda lr, lc: lasad_attention(
        inputs["q"], inputs["k"], inputs["v"], grid=case.grid, variant="2d", log_decay_row=lr,
        log_decay_col=lc, prefix_k=inputs["prefix_k"], prefix_v=inputs["prefix_v"],
    ))(inputs["log_decay_row"], inputs["log_decay_col"])
    assert rel_error(actual, expected) < 1e-5


# ----------------------------------------------------------------------------- bad input


def _good():
    return make_inputs(Case("grid2x3", batch=1, grid=(2, 3), heads=2, d=4, dv=4, prefix=1), seed=0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(grid=(3, 3)), "does not match grid 3x3"),
        (dict(grid=(2, 0)), "grid must be a pair"),
        (dict(grid=6), "grid must be a pair"),
        (dict(variant="3d"), "variant must be one of"),
        (dict(impl="pallas_magic"), "impl must be one of"),
        (dict(q=jnp.zeros((6, 2, 4))), "q must have rank 4"),
        (dict(v=jnp.zeros((1, 5, 2, 4))), "v must match q"),
        (dict(k=jnp.zeros((1, 6, 2, 8))), "q and k must have the same shape"),
        (dict(k=jnp.zeros((1, 6, 2, 4), jnp.bfloat16)), "share one dtype"),
        (dict(q=jnp.zeros((1, 6, 2, 4), jnp.int32)), "q must be a floating dtype"),
        (dict(log_decay_row=jnp.array([-0.1, 0.2])), "log_decay_row must be <= 0"),
        (dict(log_decay_col=jnp.array([0.5, -0.2])), "log_decay_col must be <= 0"),
        (dict(log_decay_row=jnp.zeros((3,)) - 0.1), r"log_decay_row must have shape \[heads=2\]"),
        (dict(log_decay_col=None), "needs log_decay_col"),
        (dict(prefix_v=None), "prefix_k and prefix_v must be given together"),
        (dict(prefix_k=jnp.zeros((1, 1, 3, 4))), "prefix_k must have shape"),
        (dict(prefix_v=jnp.zeros((1, 2, 2, 4))), "same prefix length"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(change, match):
    kwargs = dict(_good(), grid=(2, 3), variant="2d", impl="chunked")
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        lasad_attention(**kwargs)


def test_unused_decays_may_be_omitted():
    inputs = _good()
    inputs.update(log_decay_row=None, log_decay_col=None)
    out = lasad_attention(**inputs, grid=(2, 3), variant="none")
    inputs["log_decay_col"] = jnp.array([-0.1, -0.2])
    out_1d = lasad_attention(**inputs, grid=(2, 3), variant="1d")
    chex.assert_equal_shape([out, out_1d])
