"""`impl="pallas_row_blocks"` (kernels/row_blocks.py): the parallel-form kernel inside blocks of 16
rows and the column sweeps across them, run in Pallas interpret mode on CPU against the quadratic
reference, forward and every gradient; lowered for CUDA through jax.export.

Grids taller than one block (16 rows) run the sweeps: a last block of one row (33x5, 17x16), whole
blocks only (32x3), one column (40x1); shorter grids are the parallel form alone.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, assert_gradients_close, magnitude_inputs, make_inputs, rel_error

from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad import ParallelBlocks, RowBlocks, lasad_attention, lasad_attention_row_blocks
from lasadgen_jax.ops.lasad.kernels import row_blocks

# 16-token tiles in the parallel form, so that a block of 16 rows spans several of its tiles.
TILES = RowBlocks(parallel=ParallelBlocks(block=16))
CASES = {
    case.name: case
    for case in [
        Case("grid33x5_prefix1", batch=2, grid=(33, 5), heads=2, d=16, dv=16, prefix=1),
        Case("grid17x16_d36_dv20", batch=1, grid=(17, 16), heads=1, d=36, dv=20, prefix=0),
        Case("grid32x3_prefix2", batch=2, grid=(32, 3), heads=2, d=16, dv=16, prefix=2),
        Case("column40x1", batch=1, grid=(40, 1), heads=2, d=16, dv=16, prefix=0),
        Case("grid20x7_prefix2", batch=2, grid=(20, 7), heads=2, d=16, dv=16, prefix=2),
        Case("grid7x16_one_block", batch=1, grid=(7, 16), heads=2, d=16, dv=16, prefix=1),
        Case("row1x9_one_block", batch=1, grid=(1, 9), heads=1, d=16, dv=16, prefix=0),
    ]
}


def ops(grid):
    reference = functools.partial(lasad_attention, grid=grid, variant="2d", impl="reference")
    kernel = functools.partial(lasad_attention_row_blocks, grid=grid, variant="2d", interpret=True, blocks=TILES)
    return reference, kernel


def gradients(op, inputs, cotangent):
    loss = lambda diff: jnp.sum(cotangent.astype(jnp.float32) * op(**diff).astype(jnp.float32))
    return jax.jit(jax.grad(loss))(inputs)


def check(case, dtype, tolerance, seed):
    """Forward and every gradient against the reference (helpers.assert_gradients_close; in bf16 the
    log decays against the sum of their terms' magnitudes)."""
    inputs = make_inputs(case, seed=seed, dtype=dtype)
    reference, kernel = ops(case.grid)
    out = jax.jit(lambda x: kernel(**x))(inputs)
    chex.assert_shape(out, (case.batch, case.grid[0] * case.grid[1], case.heads, case.dv))
    chex.assert_type(out, dtype)
    error = rel_error(out, reference(**inputs))
    assert error < tolerance, f"forward: relative error {error:.2e} >= {tolerance}"

    cotangent = jax.random.normal(jax.random.PRNGKey(seed + 1), out.shape).astype(dtype)
    expected, actual = gradients(reference, inputs, cotangent), gradients(kernel, inputs, cotangent)
    scale = None
    if jnp.dtype(dtype).itemsize < 4:
        scale = gradients(reference, magnitude_inputs(inputs), jnp.abs(cotangent))
    assert_gradients_close(actual, expected, inputs, tolerance, scale)


@pytest.mark.parametrize("case_name", ["grid33x5_prefix1", "grid17x16_d36_dv20", "grid32x3_prefix2", "column40x1",
                                       "grid7x16_one_block", "row1x9_one_block"])
def test_forward_and_gradients_float32(case_name):
    check(CASES[case_name], jnp.float32, 1e-4, seed=len(case_name))


def test_forward_and_gradients_bfloat16():
    check(CASES["grid20x7_prefix2"], jnp.bfloat16, 2e-2, seed=3)


def test_strong_and_weak_decays_float32():
    """Log decays near 0 (g ~ 1: sums over many rows) and far below (g ~ 0.05: states near zero)."""
    case = CASES["grid33x5_prefix1"]
    for low, high in ((-0.02, -0.001), (-3.0, -2.5)):
        inputs = make_inputs(case, seed=11, log_decay_range=(low, high))
        reference, kernel = ops(case.grid)
        error = rel_error(jax.jit(lambda x: kernel(**x))(inputs), reference(**inputs))
        assert error < 1e-4, (low, high, error)


def test_lowers_to_triton_forward_and_backward():
    """The parallel form's three kernels and the eight sweeps (forward: two; backward: two each for
    dq, dk, dv) pass Pallas's Triton lowering (jax.export for CUDA on the CPU)."""
    case = Case("grid64x64_d64", batch=2, grid=(64, 64), heads=2, d=64, dv=64, prefix=1)
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=jnp.bfloat16).items() if x is not None}
    op = functools.partial(lasad_attention_row_blocks, grid=case.grid, variant="2d")
    both = jax.jit(jax.value_and_grad(lambda x: jnp.sum(op(**x).astype(jnp.float32))))
    triton = "__gpu$xla.gpu.triton"
    module = jax.export.export(
        both, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)]
    )(inputs).mlir_module()
    assert module.count(f"@{triton}") == 3 + 8
    for name in ("lasad_parallel_2d", "lasad_row_blocks_sweep_down_incl", "lasad_row_blocks_sweep_down_excl",
                 "lasad_row_blocks_sweep_up_incl", "lasad_row_blocks_sweep_up_excl"):
        assert f'name = "{name}"' in module, name


def test_sweep_value_tile_rule():
    assert row_blocks.sweep_dv_block(RowBlocks(), batch=8, heads=16, dv=64) == 64     # 128 programs
    assert row_blocks.sweep_dv_block(RowBlocks(), batch=2, heads=16, dv=64) == 16     # 64-wide: 32 programs
    assert row_blocks.sweep_dv_block(RowBlocks(), batch=4, heads=16, dv=64) == 32
    assert row_blocks.sweep_dv_block(RowBlocks(dv_block=32), batch=2, heads=16, dv=64) == 32
    assert row_blocks.sweep_dv_block(RowBlocks(), batch=64, heads=16, dv=16) == 16


@pytest.mark.parametrize("field, value", [("rows", 8), ("rows", 24), ("dv_block", 8), ("num_warps", 3),
                                          ("num_stages", 0)])
def test_row_blocks_validate_themselves(field, value):
    with pytest.raises(ValueError, match=f"RowBlocks.{field}"):
        RowBlocks(**{field: value})


def test_other_variants_and_backends_are_refused():
    case = CASES["grid33x5_prefix1"]
    inputs = make_inputs(case, seed=0)
    with pytest.raises(ValueError, match="'2d' variant only"):
        lasad_attention_row_blocks(**inputs, grid=case.grid, variant="1d", interpret=True)
    with pytest.raises(ValueError, match="GPU"):
        lasad_attention_row_blocks(**inputs, grid=case.grid, variant="2d", backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="pallas_row_blocks' needs a GPU or TPU"):
        lasad.lasad_attention(**inputs, grid=case.grid, variant="2d", impl="pallas_row_blocks")


def test_lowers_to_triton_under_the_trainers_shard_map():
    """Inside per_device_heads' shard_map (how the trainer's step runs a kernel on a mesh), forward
    and backward still lower to the eleven Triton kernels for CUDA."""
    from jax.sharding import Mesh

    from lasadgen_jax import sharding

    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    op = functools.partial(lasad_attention_row_blocks, grid=(64, 32), variant="2d")
    case = Case("grid64x32", batch=2, grid=(64, 32), heads=4, d=64, dv=64, prefix=0)
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=jnp.bfloat16).items() if x is not None}
    per_device = sharding.per_device_heads(op, mesh, batch=2, heads=4)
    both = jax.jit(jax.value_and_grad(lambda x: jnp.sum(per_device(**x).astype(jnp.float32))))
    triton = "__gpu$xla.gpu.triton"
    module = jax.export.export(both, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(triton)])(inputs).mlir_module()
    assert "shard_map" in str(jax.make_jaxpr(both)(inputs))
    assert module.count(f"@{triton}") == 3 + 8
