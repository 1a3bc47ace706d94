"""The decode state and step: the lean XLA step against the reference, the fused Pallas step
(kernels/decode.py, GPU and TPU bodies in interpret mode) against the XLA step, bf16 storage,
lowering for CUDA and TPU, and the decode_impl switch."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, make_inputs, rel_error, teacher_forced_logits, tiny_model

from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad import recurrent
from lasadgen_jax.ops.lasad.kernels import decode as fused

CASES = [
    Case("grid3x5_batch1_prefix2", batch=1, grid=(3, 5), heads=2, d=16, dv=32, prefix=2),
    Case("grid3x5_batch3_prefix1", batch=3, grid=(3, 5), heads=2, d=16, dv=16, prefix=1),
    Case("row1x7_batch3_prefix1", batch=3, grid=(1, 7), heads=2, d=16, dv=32, prefix=1),
    Case("column6x1_batch1_prefix2", batch=1, grid=(6, 1), heads=1, d=32, dv=16, prefix=2),
]
CASE_BY_NAME = {case.name: case for case in CASES}
BACKENDS = ("gpu", "tpu")


def with_prefix(case, seed, dtype=jnp.float32):
    inputs = make_inputs(case, seed=seed, dtype=dtype)
    if inputs["prefix_k"] is None and case.prefix:
        raise AssertionError("make_inputs gave no prefix")
    return inputs


@functools.cache
def jitted_step(grid, variant, row_start, impl):
    """A jitted decode step: impl 'xla' (recurrent.decode_step) or 'gpu'/'tpu' (fused, interpreted)."""
    if impl == "xla":
        step = functools.partial(recurrent.decode_step, grid=grid, variant=variant, row_start=row_start)
    else:
        step = functools.partial(fused.decode_step, grid=grid, variant=variant, row_start=row_start, backend=impl,
                                 interpret=True)
    return jax.jit(step)


def run_steps(case, variant, impl, inputs, state_dtype="float32", static_rows=True, prefix_vectors=True):
    """Every cell's output [B, N, H, dv] and the final state, cell by cell as the sampler runs them
    (row_start static), or with row_start=None (the step decides under a lax.cond). The prefix is kept
    as key/value slots (prefix_vectors) or as a matrix."""
    state = lasad.init_state(case.batch, case.heads, case.d, case.dv, grid=case.grid, variant=variant,
                             state_dtype=state_dtype, num_prefix=case.prefix if prefix_vectors else 0)
    assert ("prefix_k" in state) == bool(prefix_vectors and case.prefix)
    if case.prefix:
        state = lasad.fold_prefix(state, inputs["prefix_k"], inputs["prefix_v"])
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    w = case.grid[1]
    outputs, states = [], []
    for cell in range(q.shape[1]):
        row_start = (cell % w == 0) if static_rows else None
        step = jitted_step(case.grid, variant, row_start, impl)
        previous = max(cell - 1, 0)  # ignored at cell 0
        out, state = step(state, q[:, cell], k[:, previous], v[:, previous], jnp.int32(cell),
                          log_decay_row=inputs["log_decay_row"], log_decay_col=inputs["log_decay_col"])
        outputs.append(out)
        states.append(state)
    return jnp.stack(outputs, axis=1), states


def reference_output(case, variant, inputs):
    return lasad.lasad_attention(**inputs, grid=case.grid, variant=variant, impl="reference")


# ----------------------------------------------------------------------------- the lean XLA step


@pytest.mark.parametrize("static_rows", [True, False], ids=["static_rows", "traced_rows"])
@pytest.mark.parametrize("case_name", CASE_BY_NAME)
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_xla_steps_match_reference(variant, case_name, static_rows):
    case = CASE_BY_NAME[case_name]
    inputs = with_prefix(case, seed=len(case_name) + 3)
    # the prefix as slots with the row structure static, as a matrix with it traced
    actual, _ = run_steps(case, variant, "xla", inputs, static_rows=static_rows, prefix_vectors=static_rows)
    chex.assert_type(actual, jnp.float32)
    assert rel_error(actual, reference_output(case, variant, inputs)) < 1e-5


def test_2d_state_layout_and_size():
    state = lasad.init_state(2, 3, 8, 4, grid=(5, 7), variant="2d")
    chex.assert_shape([state["columns"], state["row_k"], state["row_v"], state["prefix"]],
                      [(2, 3, 7, 8, 4), (2, 3, 16, 8), (2, 3, 16, 4), (2, 3, 8, 4)])
    assert recurrent.row_slots(1) == 16 and recurrent.row_slots(17) == 32 and recurrent.row_slots(64) == 64
    bf16 = lasad.init_state(1, 1, 8, 8, grid=(2, 2), variant="2d_row", state_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))


def test_short_prefix_kept_as_vectors():
    assert recurrent.prefix_slots(1, 64, 64) == 1 and recurrent.prefix_slots(3, 64, 64) == 4
    assert recurrent.prefix_slots(0, 64, 64) == 0 and recurrent.prefix_slots(32, 64, 64) == 0  # the matrix is smaller
    state = lasad.init_state(2, 3, 64, 32, grid=(4, 4), variant="1d", num_prefix=3)
    chex.assert_shape([state["prefix_k"], state["prefix_v"]], [(2, 3, 4, 64), (2, 3, 4, 32)])
    assert "prefix" not in state
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    prefix_k, prefix_v = jax.random.normal(keys[0], (2, 3, 3, 64)), jax.random.normal(keys[1], (2, 3, 3, 32))
    filled = lasad.fold_prefix(state, prefix_k, prefix_v)
    np.testing.assert_array_equal(filled["prefix_k"][:, :, :3], jnp.swapaxes(prefix_k, 1, 2))
    np.testing.assert_array_equal(filled["prefix_v"][:, :, 3], 0.0)
    # a prefix of another length: the state keeps the prefix as the matrix, of everything folded so far
    longer = lasad.fold_prefix(filled, prefix_k[:, :2], prefix_v[:, :2])
    assert "prefix_k" not in longer and longer["prefix"].dtype == jnp.float32
    expected = lasad.common.prefix_state(prefix_k, prefix_v) + lasad.common.prefix_state(prefix_k[:, :2],
                                                                                         prefix_v[:, :2])
    assert rel_error(longer["prefix"], expected) < 1e-6


def test_bad_state_dtype_raises():
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        lasad.init_state(1, 1, 8, 8, grid=(2, 2), variant="1d", state_dtype="float16")


# ----------------------------------------------------------------------------- bf16 storage

# bf16 storage rounds the state to 8 significant bits after every update: the error grows with the
# number of updates a state takes. Bound here (15 cells, decays in [e^-1, e^-0.05]): 1e-2 of the
# output's norm against float32 storage (measured 1.7e-3 to 3.7e-3 over the variants), 5e-3 between
# the fused and the XLA step with the same storage (measured 0.4e-3 to 1.6e-3).
BF16_STATE_BOUND = 1e-2
BF16_FUSED_BOUND = 5e-3


@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_bf16_storage_is_close_to_float32(variant):
    case = CASE_BY_NAME["grid3x5_batch3_prefix1"]
    inputs = with_prefix(case, seed=21)
    exact, _ = run_steps(case, variant, "xla", inputs)
    stored, states = run_steps(case, variant, "xla", inputs, state_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(states[-1]))
    chex.assert_type(stored, jnp.float32)
    error = rel_error(stored, exact)
    assert 0 < error < BF16_STATE_BOUND


# ----------------------------------------------------------------------------- the fused step


def assert_states_close(actual, expected, tolerance):
    assert set(actual) == set(expected)
    for key in expected:
        chex.assert_equal_shape([actual[key], expected[key]])
        assert actual[key].dtype == expected[key].dtype, key
        assert rel_error(actual[key].astype(jnp.float32), expected[key].astype(jnp.float32)) <= tolerance, key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", CASE_BY_NAME)
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_fused_step_matches_xla_step(variant, case_name, backend):
    case = CASE_BY_NAME[case_name]
    inputs = with_prefix(case, seed=len(case_name) + 7)
    expected, expected_states = run_steps(case, variant, "xla", inputs)
    actual, actual_states = run_steps(case, variant, backend, inputs)
    chex.assert_type(actual, jnp.float32)
    chex.assert_equal_shape([actual, expected])
    assert rel_error(actual, expected) < 1e-5
    for cell in (case.grid[1] - 1, case.grid[1], len(actual_states) - 1):  # a row's end and the next start
        assert_states_close(actual_states[min(cell, len(actual_states) - 1)],
                            expected_states[min(cell, len(expected_states) - 1)], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_fused_step_with_a_prefix_matrix(variant, backend):
    case = CASE_BY_NAME["grid3x5_batch3_prefix1"]
    inputs = with_prefix(case, seed=17)
    expected, _ = run_steps(case, variant, "xla", inputs, prefix_vectors=False)
    actual, states = run_steps(case, variant, backend, inputs, prefix_vectors=False)
    assert "prefix" in states[-1]
    assert rel_error(actual, expected) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["2d", "2d_row"])
def test_fused_step_with_traced_rows(variant, backend):
    case = CASE_BY_NAME["grid3x5_batch1_prefix2"]
    inputs = with_prefix(case, seed=5)
    actual, _ = run_steps(case, variant, backend, inputs, static_rows=False)
    assert rel_error(actual, reference_output(case, variant, inputs)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_fused_step_bf16_storage_and_inputs(variant, backend):
    """bf16 inputs and bf16 storage: the fused step against the XLA step with the same storage (both
    round the same float32 updates; the 2d fold's matmul inputs are bf16 in both) and against float32."""
    case = CASE_BY_NAME["grid3x5_batch3_prefix1"]
    inputs = with_prefix(case, seed=9, dtype=jnp.bfloat16)
    expected, _ = run_steps(case, variant, "xla", inputs, state_dtype="bfloat16")
    actual, _ = run_steps(case, variant, backend, inputs, state_dtype="bfloat16")
    assert rel_error(actual, expected) < BF16_FUSED_BOUND
    exact, _ = run_steps(case, variant, "xla", inputs)
    assert rel_error(actual, exact) < BF16_STATE_BOUND


def test_tpu_body_takes_odd_head_dims():
    case = Case("grid3x5_d12_dv20", batch=1, grid=(3, 5), heads=1, d=12, dv=20, prefix=1)
    inputs = with_prefix(case, seed=31)
    actual, _ = run_steps(case, "2d", "tpu", inputs)
    assert rel_error(actual, reference_output(case, "2d", inputs)) < 1e-5


def test_gpu_body_refuses_head_dims_it_cannot_tile():
    state = lasad.init_state(1, 1, 12, 16, grid=(2, 2), variant="1d")
    x = jnp.zeros((1, 1, 12))
    with pytest.raises(ValueError, match="powers of two >= 16"):
        fused.decode_step(state, x, x, jnp.zeros((1, 1, 16)), 1, grid=(2, 2), variant="1d", log_decay_row=None,
                          log_decay_col=jnp.zeros(1) - 0.1, backend="gpu", interpret=True)


# ----------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_fused_step_lowers_to_triton_and_mosaic_tpu(variant):
    """Both bodies pass Pallas's Triton and Mosaic TPU lowerings (jax.export on the CPU), for the
    in-row and the row-start kernels, float32 storage with a prefix matrix and bf16 with prefix slots."""
    grid, batch, heads, d = (4, 24), 2, 2, 64
    for state_dtype, num_prefix in (("float32", 0), ("bfloat16", 1)):
        state = lasad.init_state(batch, heads, d, d, grid=grid, variant=variant, state_dtype=state_dtype,
                                 num_prefix=num_prefix)
        q = jnp.zeros((batch, heads, d), jnp.bfloat16)
        decays = jnp.full((heads,), -0.1)
        for row_start in (False, True):
            for platform in ("cuda", "tpu"):
                step = jax.jit(functools.partial(
                    fused.decode_step, grid=grid, variant=variant, row_start=row_start,
                    backend="gpu" if platform == "cuda" else "tpu", log_decay_row=decays, log_decay_col=decays))
                triton = "__gpu$xla.gpu.triton"
                checks = [jax.export.DisabledSafetyCheck.custom_call(triton)] if platform == "cuda" else []
                module = jax.export.export(step, platforms=[platform], disabled_checks=checks)(
                    state, q, q, q, jnp.int32(grid[1] if row_start else 5)).mlir_module()
                name = f"lasad_decode_{variant}{'_row_start' if row_start and variant in ('2d', '2d_row') else ''}"
                if platform == "cuda":
                    assert module.count(f"@{triton}") == 1 and f'name = "{name}"' in module
                else:
                    assert module.count("tpu_custom_call") == 1


# ----------------------------------------------------------------------------- the switch


def test_decode_impl_resolves_in_one_place():
    assert lasad.resolve_decode_impl("auto", backend="cpu") == "xla"
    assert lasad.resolve_decode_impl("auto", backend="gpu", head_dims=(64, 64)) == "pallas"
    assert lasad.resolve_decode_impl("auto", backend="gpu", head_dims=(60, 60)) == "xla"
    assert lasad.resolve_decode_impl("auto", backend="tpu", head_dims=(60, 60)) == "pallas"
    assert lasad.resolve_decode_impl("xla", backend="gpu") == "xla"
    with pytest.raises(ValueError, match="decode_impl must be one of"):
        lasad.resolve_decode_impl("fused")
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        lasad.resolve_decode_impl("pallas", backend="cpu")


def test_decode_dispatch_matches_xla_step():
    case = CASE_BY_NAME["grid3x5_batch3_prefix1"]
    inputs = with_prefix(case, seed=2)
    state = lasad.init_state(case.batch, case.heads, case.d, case.dv, grid=case.grid, variant="2d")
    args = (state, inputs["q"][:, 6], inputs["k"][:, 5], inputs["v"][:, 5], 6)
    kwargs = dict(grid=case.grid, variant="2d", log_decay_row=inputs["log_decay_row"],
                  log_decay_col=inputs["log_decay_col"], row_start=False)
    expected, _ = recurrent.decode_step(*args, **kwargs)
    actual, _ = lasad.decode(*args, **kwargs, impl="auto")
    np.testing.assert_array_equal(actual, expected)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("attention", lasad.VARIANTS)
def test_model_decodes_with_bf16_state_storage(attention):
    model = tiny_model(attention, grid=(3, 5), decode_state_dtype="bfloat16")
    tokens = jax.random.randint(jax.random.PRNGKey(4), (3, 15), 0, model.config.vocab_size)
    labels = jnp.array([0, 2, 5], jnp.int32)
    state = model.init_decode_state(3)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state))
    assert rel_error(teacher_forced_logits(model, tokens, labels), model(tokens, labels)) < BF16_STATE_BOUND


# ----------------------------------------------------------------------------- on a GPU or TPU

on_device = pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="needs a GPU or TPU")


@on_device
@pytest.mark.parametrize("grid", [(4, 24), (2, 64), (6, 1)], ids=["4x24", "2x64", "6x1"])
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_compiled_fused_step_matches_xla_step_on_device(variant, grid):
    """The compiled kernel (not interpreted) against the XLA step at the model's head dim, float32 and
    bf16 storage, every cell of the grid."""
    backend = "gpu" if jax.default_backend() == "gpu" else "tpu"
    case = Case(f"device_{grid}", batch=8, grid=grid, heads=4, d=64, dv=64, prefix=1)
    inputs = with_prefix(case, seed=11)
    for state_dtype, tolerance in (("float32", 1e-5), ("bfloat16", BF16_FUSED_BOUND)):
        state = lasad.init_state(case.batch, case.heads, case.d, case.dv, grid=grid, variant=variant,
                                 state_dtype=state_dtype, num_prefix=case.prefix)
        states = {"xla": lasad.fold_prefix(state, inputs["prefix_k"], inputs["prefix_v"])}
        states["fused"] = states["xla"]
        steps = {
            (impl, row_start): jax.jit(functools.partial(
                recurrent.decode_step if impl == "xla" else functools.partial(fused.decode_step, backend=backend),
                grid=grid, variant=variant, row_start=row_start, log_decay_row=inputs["log_decay_row"],
                log_decay_col=inputs["log_decay_col"]))
            for impl in ("xla", "fused") for row_start in (False, True)
        }
        outputs = {"xla": [], "fused": []}
        for cell in range(grid[0] * grid[1]):
            previous = max(cell - 1, 0)
            for impl in ("xla", "fused"):
                out, states[impl] = steps[impl, cell % grid[1] == 0](
                    states[impl], inputs["q"][:, cell], inputs["k"][:, previous], inputs["v"][:, previous],
                    jnp.int32(cell))
                outputs[impl].append(out)
        assert rel_error(jnp.stack(outputs["fused"]), jnp.stack(outputs["xla"])) < tolerance, state_dtype
        assert_states_close(states["fused"], states["xla"], tolerance)


@on_device
@pytest.mark.parametrize("attention", lasad.VARIANTS)
def test_model_decodes_with_the_fused_step_on_device(attention):
    model = tiny_model(attention, grid=(3, 5), decode_impl="pallas")
    tokens = jax.random.randint(jax.random.PRNGKey(4), (3, 15), 0, model.config.vocab_size)
    labels = jnp.array([0, 2, 5], jnp.int32)
    # 1e-3, not the CPU's 1e-4: on a GPU the parallel forward's float32 matmuls run at the default
    # precision (TF32 on Hopper); the fused step itself matches the XLA step to 1e-5 (test above).
    assert rel_error(teacher_forced_logits(model, tokens, labels), model(tokens, labels)) < 1e-3
