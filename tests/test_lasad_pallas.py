"""The LASAD Pallas kernels (GPU/Triton and TPU/Mosaic bodies of the chunked kernels, and of the
fused parallel-form kernel: backends "parallel_gpu", "parallel_tpu" here) in interpret mode,
against the reference.

Every comparison is with `impl="reference"`, the quadratic oracle, never with another fast path.
Sizes are small so that interpret mode stays quick on a CPU; the full-size checks run on the GPU
(benchmarks/kernels.py).
"""

from __future__ import annotations

import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import pytest
from helpers import Case, assert_gradients_close, magnitude_inputs, make_inputs, rel_error

from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad import (
    BlockSizes,
    ChunkOptions,
    ParallelBlocks,
    lasad_attention,
    lasad_attention_pallas,
    lasad_attention_parallel,
)
from lasadgen_jax.ops.lasad.kernels import backend as kernel_backend
from lasadgen_jax.ops.lasad.kernels import chunk, chunk_mgpu

BACKENDS = ("gpu", "tpu")
CASES = {
    case.name: case
    for case in [
        # 3x7: rows not a power of two, padded slots in every 2d/2d_row chunk, prefix keys.
        Case("grid3x7_prefix2", batch=2, grid=(3, 7), heads=2, d=8, dv=6, prefix=2),
        # 12x20, d = 64: several chunks for 1d (128 tokens) and 2d_row (6 rows = 120 of 128 slots).
        Case("grid12x20_d64", batch=1, grid=(12, 20), heads=2, d=64, dv=64, prefix=0),
        # odd head dims, padded to 64 (GPU) or 128 lanes (TPU).
        Case("grid4x5_d60_prefix3", batch=1, grid=(4, 5), heads=1, d=60, dv=36, prefix=3),
        Case("column9x1", batch=2, grid=(9, 1), heads=1, d=4, dv=6, prefix=0),
        Case("row1x9_prefix1", batch=1, grid=(1, 9), heads=3, d=4, dv=4, prefix=1),
    ]
}
# Small tiles so that the test grids span several chunks and tiles.
SMALL_BLOCKS = BlockSizes(block_tokens=32, dv_block=16, block_tokens_2d=32, d_block_2d=16, dv_block_2d=16)


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) % 2**16


@functools.cache
def jitted_op(grid, variant, backend, block=BlockSizes(), options=ChunkOptions()):
    if backend == "reference":
        return jax.jit(functools.partial(lasad_attention, grid=grid, variant=variant, impl="reference"))
    if backend.startswith("parallel_"):
        blocks = block if isinstance(block, ParallelBlocks) else ParallelBlocks()
        return jax.jit(functools.partial(lasad_attention_parallel, grid=grid, variant=variant, interpret=True,
                                         backend=backend.removeprefix("parallel_"), blocks=blocks))
    return jax.jit(functools.partial(
        lasad_attention_pallas, grid=grid, variant=variant, backend=backend, interpret=True, block_sizes=block,
        options=options,
    ))


@functools.cache
def jitted_grads(grid, variant, backend, block=BlockSizes(), options=ChunkOptions()):
    op = jitted_op(grid, variant, backend, block, options)

    def loss(diff, cotangent):
        return jnp.sum(cotangent.astype(jnp.float32) * op(**diff).astype(jnp.float32))

    return jax.jit(jax.grad(loss))


def check_forward(case, variant, backend, dtype, tolerance, block=BlockSizes(), options=ChunkOptions()):
    inputs = make_inputs(case, seed=seed_of(case, variant, backend, dtype), dtype=dtype)
    expected = jitted_op(case.grid, variant, "reference")(**inputs)
    actual = jitted_op(case.grid, variant, backend, block, options)(**inputs)
    chex.assert_shape(actual, (case.batch, case.grid[0] * case.grid[1], case.heads, case.dv))
    chex.assert_type(actual, dtype)
    error = rel_error(actual, expected)
    assert error < tolerance, f"forward: relative error {error:.2e} >= {tolerance}"


def check_grads(case, variant, backend, dtype, tolerance, block=BlockSizes(), log_decay_range=(-1.0, -0.05),
                options=ChunkOptions()):
    """Every gradient against the reference's (helpers.assert_gradients_close; in bf16 the log
    decays against the sum of their terms' magnitudes); decays the variant does not use must be 0."""
    seed = seed_of("grads", case, variant, backend, dtype)
    inputs = make_inputs(case, seed=seed, dtype=dtype, log_decay_range=log_decay_range)
    cotangent = jax.random.normal(jax.random.PRNGKey(seed + 1), inputs["v"].shape).astype(dtype)
    expected = jitted_grads(case.grid, variant, "reference")(inputs, cotangent)
    actual = jitted_grads(case.grid, variant, backend, block, options)(inputs, cotangent)
    decay_scale = None
    if jnp.dtype(dtype).itemsize < 4:
        decay_scale = jitted_grads(case.grid, variant, "reference")(magnitude_inputs(inputs), jnp.abs(cotangent))
    used_row, used_col = lasad.common.USES_DECAY[variant]
    unused = [name for name, used in (("log_decay_row", used_row), ("log_decay_col", used_col)) if not used]
    assert_gradients_close(actual, expected, inputs, tolerance, decay_scale, unused)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_forward_float32_matches_reference(variant, backend):
    check_forward(CASES["grid3x7_prefix2"], variant, backend, jnp.float32, 1e-4)


@pytest.mark.parametrize(
    "variant, case_name",
    [("2d", "grid12x20_d64"), ("2d_row", "grid12x20_d64"), ("1d", "grid12x20_d64"),
     ("2d", "grid4x5_d60_prefix3"), ("1d", "grid4x5_d60_prefix3"), ("2d", "column9x1"), ("2d", "row1x9_prefix1")],
)
def test_forward_shapes_gpu_kernel(variant, case_name):
    check_forward(CASES[case_name], variant, "gpu", jnp.float32, 1e-4)


def test_forward_odd_head_dims_tpu_kernel():
    check_forward(CASES["grid4x5_d60_prefix3"], "2d", "tpu", jnp.float32, 1e-4)


@pytest.mark.parametrize("variant", ["2d", "1d"])
def test_forward_bfloat16_matches_reference(variant):
    check_forward(CASES["grid12x20_d64"], variant, "gpu", jnp.bfloat16, 2e-2)


@pytest.mark.parametrize("variant", ["2d_row", "2d"])
def test_forward_small_tiles_many_chunks(variant):
    """Tiles smaller than the head dims: several value tiles (and key tiles for 2d) per head."""
    check_forward(CASES["grid12x20_d64"], variant, "gpu", jnp.float32, 1e-4, block=SMALL_BLOCKS)


def test_two_pass_gpu_kernel_forward_and_gradients():
    """The GPU generic kernel's two-pass form (chunk states first, then all chunks in parallel)."""
    block, two_pass = BlockSizes(block_tokens=32), ChunkOptions(parallel_chunks=2)
    case = Case("grid6x20_prefix1", batch=1, grid=(6, 20), heads=2, d=16, dv=32, prefix=1)
    check_forward(case, "2d_row", "gpu", jnp.float32, 1e-4, block=block, options=two_pass)
    check_forward(case, "1d", "gpu", jnp.float32, 1e-4, block=block, options=two_pass)
    check_grads(case, "1d", "gpu", jnp.float32, 1e-4, block=block, options=two_pass)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "variant, backend",
    [("2d", "gpu"), ("2d_row", "gpu"), ("1d", "gpu"), ("none", "gpu"), ("2d", "tpu"), ("2d_row", "tpu")],
)
def test_gradients_float32_match_reference(variant, backend):
    check_grads(CASES["grid3x7_prefix2"], variant, backend, jnp.float32, 1e-4)


@pytest.mark.parametrize("variant", ["2d", "2d_row"])
def test_gradients_bfloat16_match_reference(variant):
    check_grads(CASES["grid3x7_prefix2"], variant, "gpu", jnp.bfloat16, 2e-2)


def test_gradients_odd_head_dims():
    check_grads(CASES["grid4x5_d60_prefix3"], "2d", "gpu", jnp.float32, 1e-4)


# ----------------------------------------------------------------------------- the generic chunk backward

# Decays weak enough that pairs several chunks apart still count, so each term of the decay
# gradients (within a chunk, to the chunk edges, whole chunks of state decay) shows in the result.
WEAK_DECAYS = (-0.08, -0.01)


def test_chunk_backward_sub_blocks_and_many_chunks():
    """The GPU gradient kernel forms its within-chunk products per pair of sub-blocks (here 2 of 16
    slots per 32-slot chunk); the log-decay gradients sum every chunk's share (8 and 5 chunks)."""
    block = BlockSizes(block_tokens=32, dv_block=16, gradient_block=16)
    check_grads(Case("grid5x48_prefix2", batch=1, grid=(5, 48), heads=2, d=16, dv=24, prefix=2), "1d", "gpu",
                jnp.float32, 1e-4, block=block, log_decay_range=WEAK_DECAYS)
    check_grads(Case("grid5x16_d20", batch=2, grid=(5, 16), heads=2, d=20, dv=16, prefix=0), "2d_row", "gpu",
                jnp.float32, 1e-4, block=block, log_decay_range=WEAK_DECAYS)


def test_chunk_backward_bfloat16_many_chunks():
    """bf16 inputs over 16 chunks: the decay gradients add every chunk's share in float32."""
    check_grads(Case("grid4x64_prefix1", batch=2, grid=(4, 64), heads=2, d=16, dv=16, prefix=1), "1d", "gpu",
                jnp.bfloat16, 2e-2, block=BlockSizes(block_tokens=16), log_decay_range=WEAK_DECAYS)


def test_chunk_backward_tpu_body_1d_many_chunks():
    check_grads(Case("grid4x40_prefix1", batch=1, grid=(4, 40), heads=2, d=16, dv=16, prefix=1), "1d", "tpu",
                jnp.float32, 1e-4, block=BlockSizes(block_tokens=16), log_decay_range=WEAK_DECAYS)


def test_refwd_backward_of_the_generic_kernel():
    """ChunkOptions(backward_generic="refwd"): the forward kernel re-run plus decay-tangent calls."""
    check_grads(CASES["grid3x7_prefix2"], "2d_row", "gpu", jnp.float32, 1e-4, block=BlockSizes(block_tokens=16),
                options=ChunkOptions(backward_generic="refwd"))


@pytest.mark.parametrize("backward, kernels", [("chunks", ("lasad_1d_states_adjoints", "lasad_1d_gradients")),
                                               ("refwd", ("lasad_1d_d_col",))])
def test_generic_backward_runs_the_chosen_kernels(backward, kernels):
    case = CASES["grid3x7_prefix2"]
    inputs = {name: x for name, x in make_inputs(case, seed=0).items() if x is not None}
    op = functools.partial(lasad_attention_pallas, grid=case.grid, variant="1d", backend="gpu", interpret=True,
                           block_sizes=BlockSizes(block_tokens=16), options=ChunkOptions(backward_generic=backward))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(op(**x))))(inputs))
    for name in kernels:
        assert f"name={name}" in jaxpr, name
    other = "lasad_1d_d_col" if backward == "chunks" else "lasad_1d_gradients"
    assert f"name={other}" not in jaxpr


def test_chunk_backward_lowers_to_triton_and_mosaic_tpu():
    """The chunk backward's kernels pass Pallas's Triton lowering (jax.export for CUDA on the CPU)
    and its Mosaic TPU lowering, at 128-slot rows (two gradient sub-blocks on the GPU)."""
    case = Case("grid4x128_d64", batch=1, grid=(4, 128), heads=2, d=64, dv=64, prefix=0)
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=jnp.bfloat16).items() if x is not None}
    for backend, platform in (("gpu", "cuda"), ("tpu", "tpu")):
        op = functools.partial(lasad_attention_pallas, grid=case.grid, variant="2d_row", backend=backend)
        grad = jax.jit(jax.grad(lambda x: jnp.sum(op(**x).astype(jnp.float32))))
        if backend == "gpu":
            triton = "__gpu$xla.gpu.triton"
            module = jax.export.export(
                grad, platforms=[platform], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)]
            )(inputs).mlir_module()
            assert module.count(f"@{triton}") == 2  # both passes, then the gradients (the primal output is unused)
            assert 'name = "lasad_2d_row_gradients"' in module
        else:
            module = jax.export.export(grad, platforms=[platform])(inputs).mlir_module()
            assert module.count("tpu_custom_call") == 3  # states, adjoints, gradients


# ----------------------------------------------------------------------------- the 2d sweep backward

# ChunkOptions(backward_2d="sweep") (GPU body in interpret mode): every gradient against the reference.
# Key and value tiles of 16, so that d or dv of 36 (padded to 64) splits into several tiles whose
# partial sums must add up; 16 slots per row, so block_tokens_2d 16 / 32 gives 1 / 2 rows per chunk.
SWEEP_CASES = {
    case.name: (case, BlockSizes(block_tokens_2d=tokens, d_block_2d=16, dv_block_2d=16))
    for case, tokens in [
        # 2 chunks of 2 rows, the last with a padded row; batch 2 and prefix keys.
        (Case("grid3x5_prefix2", batch=2, grid=(3, 5), heads=2, d=16, dv=16, prefix=2), 32),
        # 4 chunks of 1 row; d = 12 (padded to 16), dv = 36 (3 value tiles of 16 after padding to 64).
        (Case("grid4x3_d12_dv36_prefix1", batch=1, grid=(4, 3), heads=2, d=12, dv=36, prefix=1), 16),
        # one row: no row pairs, so dlog_decay_row must come out 0.
        (Case("row1x6", batch=1, grid=(1, 6), heads=1, d=16, dv=12, prefix=0), 32),
        # one column: no column distances, so dlog_decay_col must come out 0; 3 chunks, d = 36.
        (Case("column5x1_d36_prefix1", batch=2, grid=(5, 1), heads=1, d=36, dv=16, prefix=1), 32),
    ]
}


SWEEP = ChunkOptions(backward_2d="sweep")


@pytest.mark.parametrize("case_name", list(SWEEP_CASES))
def test_sweep_backward_2d_gradients_float32(case_name):
    case, block = SWEEP_CASES[case_name]
    check_grads(case, "2d", "gpu", jnp.float32, 1e-4, block=block, options=SWEEP)


@pytest.mark.parametrize("case_name", ["grid3x5_prefix2", "grid4x3_d12_dv36_prefix1"])
def test_sweep_backward_2d_gradients_bfloat16(case_name):
    case, block = SWEEP_CASES[case_name]
    check_grads(case, "2d", "gpu", jnp.bfloat16, 2e-2, block=block, options=SWEEP)


def test_sweep_backward_2d_runs_the_sweep():
    """The option reaches the backward: its gradient calls the sweep kernel and no tangent kernel
    (the gradient tests alone would pass through the default backward too)."""
    case, block = SWEEP_CASES["grid3x5_prefix2"]
    inputs = make_inputs(case, seed=0)
    for backward, sweep_calls, tangent_calls in (("sweep", 1, 0), ("refwd", 0, 2)):
        op = functools.partial(lasad_attention_pallas, grid=case.grid, variant="2d", backend="gpu", interpret=True,
                               block_sizes=block, options=ChunkOptions(backward_2d=backward))
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(op(**x))))(inputs))
        assert jaxpr.count("name=lasad_2d_sweep_backward") == sweep_calls, backward
        assert jaxpr.count("name=lasad_2d_d_") == tangent_calls, backward


def test_sweep_backward_lowers_to_triton_ir():
    """Interpret mode runs the kernel body as plain jax; this lowers the gradient for CUDA (on the
    CPU, through jax.export) so that every op must pass Pallas's Triton lowering. The Triton
    compiler itself (PTX, registers) runs only on a GPU."""
    case, block = SWEEP_CASES["grid4x3_d12_dv36_prefix1"]
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=jnp.bfloat16).items() if x is not None}
    op = functools.partial(lasad_attention_pallas, grid=case.grid, variant="2d", backend="gpu", block_sizes=block,
                           options=SWEEP)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(op(**x).astype(jnp.float32))))
    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        grad, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)]
    )(inputs)
    module = exported.mlir_module()
    assert module.count(f"@{triton}") == 2  # the dq forward and the sweep (the primal output is unused)
    assert 'name = "lasad_2d_sweep_backward"' in module


def test_sweep_backward_on_tpu_raises():
    case, block = SWEEP_CASES["grid3x5_prefix2"]
    with pytest.raises(ValueError, match="GPU .Triton. kernel only"):
        lasad_attention_pallas(**make_inputs(case, seed=0), grid=case.grid, variant="2d", backend="tpu",
                               interpret=True, block_sizes=block, options=SWEEP)


# ----------------------------------------------------------------------------- the parallel-form kernel

# The fused parallel-form kernel (kernels/parallel_form.py), its bodies interpreted on CPU. GPU tiles of
# 16 tokens, so that even the 3x7 grid spans two query and two key tiles (the diagonal tile's
# mask, the walk over earlier tiles and the zero-padded end of the sequence all take part). The
# TPU body's tiles are 128 tokens: the 12x20 grid (240 tokens) spans two.
TILES_16 = ParallelBlocks(block=16)
PARALLEL = ("parallel_gpu", "parallel_tpu")


@pytest.mark.parametrize("backend", PARALLEL)
@pytest.mark.parametrize("variant", lasad.VARIANTS)
def test_parallel_kernel_forward_float32(variant, backend):
    check_forward(CASES["grid3x7_prefix2"], variant, backend, jnp.float32, 1e-4, block=TILES_16)


@pytest.mark.parametrize(
    "variant, case_name, backend, block",
    [("2d", "grid12x20_d64", "parallel_gpu", ParallelBlocks()),
     ("2d_row", "grid12x20_d64", "parallel_gpu", ParallelBlocks()),
     ("1d", "grid12x20_d64", "parallel_gpu", TILES_16), ("2d", "grid4x5_d60_prefix3", "parallel_gpu", TILES_16),
     ("2d_row", "column9x1", "parallel_gpu", TILES_16), ("2d", "row1x9_prefix1", "parallel_gpu", TILES_16),
     ("2d", "grid12x20_d64", "parallel_tpu", None), ("1d", "grid12x20_d64", "parallel_tpu", None),
     ("2d", "grid4x5_d60_prefix3", "parallel_tpu", None)],
)
def test_parallel_kernel_forward_shapes(variant, case_name, backend, block):
    check_forward(CASES[case_name], variant, backend, jnp.float32, 1e-4, block=block)


@pytest.mark.parametrize("variant, backend", [("2d", "parallel_gpu"), ("1d", "parallel_gpu"), ("2d", "parallel_tpu")])
def test_parallel_kernel_forward_bfloat16(variant, backend):
    check_forward(CASES["grid12x20_d64"], variant, backend, jnp.bfloat16, 2e-2)


# Every variant on the GPU body; on the TPU body the two variants whose decay-gradient factors
# differ most (the formulas are shared: common.pair_log_decay).
@pytest.mark.parametrize("variant, backend", [(variant, "parallel_gpu") for variant in lasad.VARIANTS]
                         + [("2d", "parallel_tpu"), ("1d", "parallel_tpu")])
def test_parallel_kernel_gradients_float32(variant, backend):
    check_grads(CASES["grid3x7_prefix2"], variant, backend, jnp.float32, 1e-4, block=TILES_16)


@pytest.mark.parametrize("variant", ["2d", "2d_row"])
def test_parallel_kernel_gradients_bfloat16(variant):
    check_grads(CASES["grid3x7_prefix2"], variant, "parallel_gpu", jnp.bfloat16, 2e-2, block=TILES_16)


@pytest.mark.parametrize("variant, case_name, backend", [
    ("2d", "grid4x5_d60_prefix3", "parallel_gpu"), ("1d", "column9x1", "parallel_gpu"),
    ("2d_row", "row1x9_prefix1", "parallel_gpu"), ("2d", "grid12x20_d64", "parallel_tpu"),
    ("2d_row", "grid12x20_d64", "parallel_tpu"),
])
def test_parallel_kernel_gradients_shapes(variant, case_name, backend):
    check_grads(CASES[case_name], variant, backend, jnp.float32, 1e-4, block=TILES_16)


def test_parallel_kernel_lowers_to_triton_ir():
    """The forward and both backward kernels pass Pallas's Triton lowering (jax.export for CUDA on
    the CPU; the Triton compiler itself runs only on a GPU)."""
    case = CASES["grid4x5_d60_prefix3"]
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=jnp.bfloat16).items() if x is not None}
    op = functools.partial(lasad_attention_parallel, grid=case.grid, variant="2d")
    both = jax.jit(jax.value_and_grad(lambda x: jnp.sum(op(**x).astype(jnp.float32))))
    triton = "__gpu$xla.gpu.triton"
    module = jax.export.export(
        both, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)]
    )(inputs).mlir_module()
    assert module.count(f"@{triton}") == 3
    for name in ("lasad_parallel_2d", "lasad_parallel_2d_dkdv", "lasad_parallel_2d_dq"):
        assert f'name = "{name}"' in module, name


def test_parallel_kernel_lowers_to_mosaic_tpu():
    """The TPU body's three kernels pass Pallas's Mosaic TPU lowering (jax.export for TPU on the
    CPU; Mosaic's own compiler runs only on a TPU), at the configs' 16x16 grid with d = 64."""
    case = Case("grid16x16_d64", batch=2, grid=(16, 16), heads=2, d=64, dv=64, prefix=0)
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=jnp.bfloat16).items() if x is not None}
    op = functools.partial(lasad_attention_parallel, grid=case.grid, variant="2d", backend="tpu")
    both = jax.jit(jax.value_and_grad(lambda x: jnp.sum(op(**x).astype(jnp.float32))))
    module = jax.export.export(both, platforms=["tpu"])(inputs).mlir_module()
    assert module.count("tpu_custom_call") == 3


def test_parallel_impl_on_cpu_raises_instead_of_falling_back():
    case = CASES["grid3x7_prefix2"]
    with pytest.raises(ValueError, match="pallas_parallel' needs a GPU or TPU"):
        lasad_attention(**make_inputs(case, seed=0), grid=case.grid, variant="2d", impl="pallas_parallel")


@pytest.mark.parametrize("field, value", [("block", 8), ("block", 48), ("num_warps", 3), ("num_stages", 0)])
def test_parallel_blocks_validate_themselves(field, value):
    with pytest.raises(ValueError, match=f"ParallelBlocks.{field}"):
        ParallelBlocks(**{field: value})
    ParallelBlocks(num_stages=3)  # any positive stage count is a valid Triton pipeline depth


# ----------------------------------------------------------------------------- errors


def test_pallas_impl_on_cpu_raises_instead_of_falling_back():
    case = CASES["grid3x7_prefix2"]
    inputs = make_inputs(case, seed=0)
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        lasad_attention(**inputs, grid=case.grid, variant="2d", impl="pallas")
    assert lasad.resolve_impl("auto", "2d", tokens=4096) == "chunked"


def test_unknown_backend_raises():
    case = CASES["grid3x7_prefix2"]
    with pytest.raises(ValueError, match="backend must be one of"):
        lasad_attention_pallas(**make_inputs(case, seed=0), grid=case.grid, variant="1d", backend="cuda")


@pytest.mark.parametrize(
    "config, field, value",
    [(BlockSizes, "block_tokens", 48), (BlockSizes, "dv_block", 8), (BlockSizes, "num_warps", 0),
     (ChunkOptions, "backward_2d", "reverse"), (ChunkOptions, "backward_generic", "sweep"),
     (BlockSizes, "gradient_block", 8), (BlockSizes, "num_stages", 0), (ChunkOptions, "parallel_chunks", 3)],
)
def test_block_sizes_and_options_validate_themselves(config, field, value):
    with pytest.raises(ValueError, match=field):
        config(**{field: value})


def test_2d_column_states_over_budget_raise():
    """A 2d tile whose column states cannot stay on chip is an error, not a silent slow path."""
    case = Case("wide", batch=1, grid=(2, 200), heads=1, d=64, dv=64, prefix=0)
    too_big = BlockSizes(d_block_2d=64, dv_block_2d=64)
    with pytest.raises(ValueError, match="on-chip budget"):
        lasad_attention_pallas(**make_inputs(case, seed=0), grid=case.grid, variant="2d", backend="gpu",
                               interpret=True, block_sizes=too_big)


# ----------------------------------------------------------------------------- Mosaic GPU kernels (chunk_mgpu.py)


@pytest.mark.parametrize("variant, grid, d", [("1d", (3, 40), 64), ("2d_row", (6, 16), 48), ("none", (2, 64), 64)])
def test_mosaic_gpu_forward_lowers(variant, grid, d):
    """chunk_mgpu.forward passes Pallas's Mosaic GPU lowering (jax.export for CUDA on the CPU).
    Its numerics need a GPU (benchmarks/mosaic_gpu.py); see the module docstring."""
    case = Case(f"grid{grid}", batch=1, grid=grid, heads=2, d=d, dv=d, prefix=0)
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=jnp.bfloat16).items() if x is not None}
    forward = jax.jit(functools.partial(chunk_mgpu.forward, grid=grid, variant=variant))
    module = jax.export.export(forward, platforms=["cuda"])(**inputs).mlir_module()
    assert "mosaic_gpu" in module


@pytest.mark.parametrize("variant, grid, d, prefix", [("1d", (3, 40), 64, 2), ("2d_row", (6, 16), 48, 0),
                                                     ("none", (2, 64), 64, 0), ("2d_row", (4, 32), 128, 0)])
def test_mosaic_gpu_lowering_forward_and_backward_lower(variant, grid, d, prefix):
    """ChunkOptions(gpu_lowering="mosaic"): the forward and the chunk backward's gradient step are
    Mosaic GPU kernels, the state/adjoint passes Triton; all pass lowering for CUDA on the CPU
    (their numerics: benchmarks/mosaic_gpu.py on a GPU)."""
    case = Case(f"grid{grid}", batch=2, grid=grid, heads=2, d=d, dv=d, prefix=prefix)
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=jnp.bfloat16).items() if x is not None}
    op = functools.partial(lasad_attention_pallas, grid=grid, variant=variant, backend="gpu",
                           options=ChunkOptions(gpu_lowering="mosaic"))
    both = jax.jit(jax.value_and_grad(lambda x: jnp.sum(op(**x).astype(jnp.float32))))
    triton = "__gpu$xla.gpu.triton"
    module = jax.export.export(
        both, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)]
    )(inputs).mlir_module()
    assert module.count(f"@{triton}") == 1  # the state/adjoint passes
    assert module.count("mosaic_gpu") >= 2  # the forward, the gradient step


def test_mosaic_gpu_two_pass_forward_lowers():
    """From parallel_chunks chunks on: the Triton state pass, then the Mosaic GPU output pass."""
    case = Case("grid8x64", batch=2, grid=(8, 64), heads=2, d=64, dv=64, prefix=0)
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=jnp.bfloat16).items() if x is not None}
    op = functools.partial(lasad_attention_pallas, grid=case.grid, variant="1d", backend="gpu",
                           options=ChunkOptions(gpu_lowering="mosaic", parallel_chunks=2))
    triton = "__gpu$xla.gpu.triton"
    module = jax.export.export(jax.jit(lambda x: op(**x)), platforms=["cuda"],
                               disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(inputs).mlir_module()
    assert module.count(f"@{triton}") == 1 and 'name = "lasad_1d_states"' in module
    assert "mosaic_gpu" in module


MOSAIC = ChunkOptions(gpu_lowering="mosaic")


@pytest.mark.parametrize("block, grid, dtype, d, interpret, error", [
    (BlockSizes(), (4, 16), jnp.float32, 64, False, "bf16 or fp16"),
    (BlockSizes(), (4, 16), jnp.bfloat16, 256, False, "head dims up to 128"),
    (BlockSizes(block_tokens=128), (4, 64), jnp.bfloat16, 64, False, "64-slot chunks"),
    (BlockSizes(), (4, 16), jnp.bfloat16, 64, True, "no interpret mode"),
])
def test_mosaic_gpu_lowering_refuses_what_it_does_not_cover(block, grid, dtype, d, interpret, error):
    case = Case("reject", batch=1, grid=grid, heads=1, d=d, dv=d, prefix=0)
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=dtype).items() if x is not None}
    with pytest.raises(ValueError, match=error):
        lasad_attention_pallas(**inputs, grid=grid, variant="1d", backend="gpu", interpret=interpret, block_sizes=block,
                               options=MOSAIC)


@pytest.mark.parametrize("hopper, dtype, grid, interpret, options, expected", [
    (True, jnp.bfloat16, (4, 16), False, ChunkOptions(), True),
    (False, jnp.bfloat16, (4, 16), False, ChunkOptions(), False),  # no Hopper GPU: Triton
    (True, jnp.float32, (4, 16), False, ChunkOptions(), False),  # float32: Triton
    (True, jnp.bfloat16, (2, 128), False, ChunkOptions(), False),  # 128-slot rows: Triton
    (True, jnp.bfloat16, (4, 16), True, ChunkOptions(), False),  # interpret mode: Triton
    (True, jnp.bfloat16, (4, 16), False, ChunkOptions(backward_generic="refwd"), False),
    (True, jnp.bfloat16, (4, 16), False, ChunkOptions(gpu_lowering="triton"), False),
    (False, jnp.bfloat16, (4, 16), False, ChunkOptions(gpu_lowering="mosaic"), True),  # explicit: not second-guessed
])
def test_gpu_lowering_auto_picks_mosaic_only_where_it_applies(monkeypatch, hopper, dtype, grid, interpret, options,
                                                              expected):
    monkeypatch.setattr(kernel_backend, "is_hopper", lambda: hopper)
    q = jnp.zeros((1, grid[0] * grid[1], 2, 64), dtype)
    block = BlockSizes()
    assert chunk.uses_mosaic_gpu("gpu", block, options, q, q, grid=grid, variant="2d_row", interpret=interpret,
                                 poison=False) is expected
    assert not chunk.uses_mosaic_gpu("tpu", block, options, q, q, grid=grid, variant="2d_row", interpret=interpret,
                                     poison=False)


def test_mosaic_gpu_lowering_needs_the_chunk_backward():
    with pytest.raises(ValueError, match="chunk backward only"):
        ChunkOptions(gpu_lowering="mosaic", backward_generic="refwd")
    with pytest.raises(ValueError, match="gpu_lowering must be one of"):
        ChunkOptions(gpu_lowering="cuda")


@pytest.mark.parametrize("variant, grid, dtype, error", [
    ("2d", (4, 16), jnp.bfloat16, "covers the variants"),
    ("1d", (4, 16), jnp.float32, "bf16 or fp16"),
    ("2d_row", (2, 128), jnp.bfloat16, "64-slot chunks"),
])
def test_mosaic_gpu_forward_rejects_what_it_does_not_cover(variant, grid, dtype, error):
    case = Case("reject", batch=1, grid=grid, heads=1, d=64, dv=64, prefix=0)
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=dtype).items() if x is not None}
    with pytest.raises(ValueError, match=error):
        chunk_mgpu.forward(**inputs, grid=grid, variant=variant)
