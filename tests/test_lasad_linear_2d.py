"""The linear-time `2d` kernel (`impl="pallas_linear"`, kernels/linear_2d.py): both bodies (GPU:
Triton, TPU: Mosaic TPU) in interpret mode against the reference, forward and every gradient,
and both lowered through jax.export (forward and backward).

Every comparison is with `impl="reference"`. Shapes are small and each case compiles one function
(output and every gradient together) so that interpret mode stays quick on a CPU; chunks of 2 to 16
rows so that every grid spans several chunks. The GPU numerics at full size are checked on the
device (benchmarks/linear_2d.py).
"""

from __future__ import annotations

import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import pytest
from helpers import Case, assert_gradients_close, magnitude_inputs, make_inputs, rel_error

from lasadgen_jax.ops.lasad import LinearBlocks, lasad_attention, lasad_attention_linear
from lasadgen_jax.ops.lasad.kernels.linear_2d import triton_dv_block

# (case, body, dtype, rows per chunk). Grids: rows and widths not powers of two, one row, one column,
# wide and tall; head dims 16 and the odd 36 / 20 (padded: GPU 64 / 32, TPU 128 lanes).
CASES = [
    (Case("grid3x5_prefix2", batch=2, grid=(3, 5), heads=2, d=16, dv=16, prefix=2), "gpu", jnp.float32, 2),
    (Case("grid3x5_prefix2", batch=2, grid=(3, 5), heads=2, d=16, dv=16, prefix=2), "tpu", jnp.float32, 2),
    (Case("row1x9_d36", batch=1, grid=(1, 9), heads=2, d=36, dv=20, prefix=0), "gpu", jnp.float32, 2),
    (Case("row1x9_d36", batch=1, grid=(1, 9), heads=2, d=36, dv=20, prefix=0), "tpu", jnp.float32, 2),
    (Case("column9x1_prefix1", batch=2, grid=(9, 1), heads=1, d=16, dv=16, prefix=1), "gpu", jnp.float32, 2),
    (Case("column9x1_prefix1", batch=2, grid=(9, 1), heads=1, d=16, dv=16, prefix=1), "tpu", jnp.float32, 4),
    (Case("grid7x16_d36", batch=1, grid=(7, 16), heads=1, d=36, dv=20, prefix=1), "gpu", jnp.float32, 2),
    (Case("grid16x7", batch=1, grid=(16, 7), heads=2, d=16, dv=16, prefix=0), "tpu", jnp.float32, 4),
    (Case("grid16x7", batch=1, grid=(16, 7), heads=2, d=16, dv=16, prefix=0), "gpu", jnp.bfloat16, 4),
    # 16-row chunks: the GPU body's per-column products on the matrix units (below 16 rows: summed).
    (Case("grid20x3", batch=1, grid=(20, 3), heads=1, d=16, dv=16, prefix=0), "gpu", jnp.float32, 16),
    (Case("grid7x16_d36", batch=1, grid=(7, 16), heads=1, d=36, dv=20, prefix=1), "tpu", jnp.bfloat16, 2),
]
# Norm-wise relative error bounds against the float32 reference on the same (rounded) inputs:
# float32 arithmetic lands near 1e-7; bf16 matmul inputs (q k^T, the states rounded to bf16 before
# their products) near 3e-3, as the other kernels (docs/lasad.md §5).
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@functools.cache
def value_and_grads(grid, backend, rows):
    """jit(inputs, cotangent) -> (output, every gradient) of lasad_attention for `backend`
    ('reference' or a kernel body in interpret mode)."""
    if backend == "reference":
        op = functools.partial(lasad_attention, grid=grid, variant="2d", impl="reference")
    else:
        op = functools.partial(lasad_attention_linear, grid=grid, variant="2d", backend=backend, interpret=True,
                               blocks=LinearBlocks(rows=rows))

    def run(diff, cotangent):
        out, pullback = jax.vjp(lambda x: op(**x), diff)
        return out, pullback(cotangent.astype(out.dtype))[0]

    return jax.jit(run)


def decay_gradient_scale(case, inputs, cotangent):
    """The reference's gradients at helpers.magnitude_inputs: the scale a bf16 decay gradient's error goes with."""
    _, grads = value_and_grads(case.grid, "reference", 0)(magnitude_inputs(inputs), jnp.abs(cotangent))
    return grads


@pytest.mark.parametrize(("case", "backend", "dtype", "rows"), CASES,
                         ids=[f"{c.name}-{b}-{jnp.dtype(t).name}-R{r}" for c, b, t, r in CASES])
def test_forward_and_gradients_match_reference(case, backend, dtype, rows):
    seed = zlib.crc32(f"{case.name}/{backend}/{jnp.dtype(dtype).name}".encode()) % 2**16
    inputs = make_inputs(case, seed=seed, dtype=dtype)
    cotangent = jax.random.normal(jax.random.PRNGKey(seed + 1), inputs["v"].shape).astype(dtype)
    expected_out, expected = value_and_grads(case.grid, "reference", 0)(inputs, cotangent)
    out, grads = value_and_grads(case.grid, backend, rows)(inputs, cotangent)
    chex.assert_shape(out, (case.batch, case.grid[0] * case.grid[1], case.heads, case.dv))
    chex.assert_type(out, dtype)
    tolerance = TOLERANCE[dtype]
    error = rel_error(out, expected_out)
    assert error < tolerance, f"forward: relative error {error:.2e} >= {tolerance}"
    scale = decay_gradient_scale(case, inputs, cotangent) if dtype == jnp.bfloat16 else None
    assert_gradients_close(grads, expected, inputs, tolerance, scale)


def _exported_forward_and_backward(backend: str, platform: str, disabled_checks=(), blocks=LinearBlocks(),
                                   grid=(6, 40), d=64):
    """The MLIR text of forward + backward at a benchmark-like shape (rows of 64 slots, d = 64)."""
    case = Case("export", batch=1, grid=grid, heads=2, d=d, dv=d, prefix=1)
    inputs = {name: x for name, x in make_inputs(case, seed=0, dtype=jnp.bfloat16).items() if x is not None}
    op = functools.partial(lasad_attention_linear, grid=grid, variant="2d", backend=backend, blocks=blocks)

    def both(inputs):
        out, pullback = jax.vjp(lambda x: op(**x), inputs)
        return out, pullback(out)

    exported = jax.export.export(jax.jit(both), platforms=[platform], disabled_checks=list(disabled_checks))
    return exported(inputs).mlir_module()


def test_gpu_body_lowers_to_triton():
    """The forward kernel (also the dq call) and the reverse sweep pass Pallas's Triton lowering
    (jax.export for CUDA on the CPU): strided column slices, state buffers, barriers."""
    triton = "__gpu$xla.gpu.triton"
    module = _exported_forward_and_backward("gpu", "cuda", [jax.export.DisabledSafetyCheck.custom_call(triton)])
    assert module.count("lasad_linear_2d_sweep") >= 1
    assert module.count(triton) == 3  # forward, dq, sweep


@pytest.mark.parametrize(("grid", "d", "rows", "stages"),
                         [((6, 40), 64, 2, 1), ((5, 7), 36, 1, 2), ((9, 64), 64, 1, 1)])
def test_mosaic_gpu_body_lowers(grid, d, rows, stages):
    """LinearBlocks(gpu_body="mosaic"): the forward and the dq call are Mosaic GPU kernels (two each:
    within-chunk pairs, column states), the reverse sweep Triton; all pass lowering for CUDA on the
    CPU, shared-memory budgets included (their numerics: benchmarks/linear_2d.py on a GPU)."""
    triton = "__gpu$xla.gpu.triton"
    blocks = LinearBlocks(gpu_body="mosaic", mosaic_rows=rows, mosaic_stages=stages)
    module = _exported_forward_and_backward("gpu", "cuda", [jax.export.DisabledSafetyCheck.custom_call(triton)],
                                            blocks=blocks, grid=grid, d=d)
    assert module.count(f"@{triton}") == 1  # the reverse sweep
    assert module.count("lasad_linear_2d_sweep") >= 1
    assert module.count("mosaic_gpu") >= 4


@pytest.mark.parametrize(("blocks", "grid", "dtype", "d", "interpret", "error"), [
    (LinearBlocks(gpu_body="mosaic"), (4, 8), jnp.float32, 16, False, "bf16 or fp16"),
    (LinearBlocks(gpu_body="mosaic"), (4, 65), jnp.bfloat16, 16, False, "up to 64 wide"),
    (LinearBlocks(gpu_body="mosaic"), (4, 8), jnp.bfloat16, 96, False, "d <= 64"),
    (LinearBlocks(gpu_body="mosaic", mosaic_rows=4), (4, 8), jnp.bfloat16, 16, False, "shared memory"),
    (LinearBlocks(gpu_body="mosaic"), (4, 8), jnp.bfloat16, 16, True, "interpret mode"),
])
def test_mosaic_gpu_body_refuses_what_it_does_not_cover(blocks, grid, dtype, d, interpret, error):
    case = Case("refuse", batch=1, grid=grid, heads=1, d=d, dv=d, prefix=0)
    inputs = make_inputs(case, seed=0, dtype=dtype)
    op = functools.partial(lasad_attention_linear, grid=grid, variant="2d", backend="gpu", blocks=blocks,
                           interpret=interpret)
    with pytest.raises(ValueError, match=error):
        jax.eval_shape(lambda x: op(**x), inputs)


def test_tpu_body_lowers_to_mosaic():
    """The same three calls pass Pallas's Mosaic TPU lowering (jax.export for TPU on the CPU);
    Mosaic's later passes run only on a TPU (unverified)."""
    module = _exported_forward_and_backward("tpu", "tpu")
    assert module.count("tpu_custom_call") == 3


def test_pallas_linear_on_cpu_raises_instead_of_falling_back():
    case = Case("cpu", batch=1, grid=(2, 3), heads=1, d=4, dv=4, prefix=0)
    inputs = make_inputs(case, seed=0)
    with pytest.raises(ValueError, match="pallas_linear"):
        lasad_attention(**inputs, grid=case.grid, variant="2d", impl="pallas_linear")


@pytest.mark.parametrize("variant", ["1d", "2d_row", "none"])
def test_other_variants_raise(variant):
    case = Case("variant", batch=1, grid=(2, 3), heads=1, d=4, dv=4, prefix=0)
    inputs = make_inputs(case, seed=0)
    with pytest.raises(ValueError, match="'2d' variant only"):
        lasad_attention_linear(**inputs, grid=case.grid, variant=variant, backend="gpu", interpret=True)


@pytest.mark.parametrize(("field", "value"), [("rows", 3), ("dv_block", 8), ("num_warps", 0), ("num_stages", 0),
                                               ("gpu_body", "cuda"), ("mosaic_rows", 3), ("mosaic_stages", 0)])
def test_linear_blocks_validate_themselves(field, value):
    with pytest.raises(ValueError, match=f"LinearBlocks.{field}"):
        LinearBlocks(**{field: value})


def _within_stand_in(q, k, v, log_decay_row, log_decay_col, *, rows):
    """What linear_2d_mgpu's within-chunk kernel computes, in jnp on the same layouts."""
    from lasadgen_jax.ops.lasad.kernels import linear_2d_mgpu

    strict, full, row_power = linear_2d_mgpu.within_tables(log_decay_row, log_decay_col, rows)
    batch, heads, length, _ = q.shape
    slots = linear_2d_mgpu.SLOTS
    tile = lambda x: x.astype(jnp.float32).reshape(batch, heads, length // (rows * slots), rows, slots, x.shape[-1])
    q_t, k_t, v_t = tile(q), tile(k), tile(v)
    out = jnp.zeros(v_t.shape, jnp.float32)
    for i in range(rows):
        for j in range(i + 1):
            decay = strict if i == j else full * row_power[:, i - j, :, None]
            scores = jnp.einsum("bhcqd,bhckd->bhcqk", q_t[:, :, :, i], k_t[:, :, :, j]) * decay[None, :, None]
            out = out.at[:, :, :, i].add(jnp.einsum("bhcqk,bhcke->bhcqe", scores, v_t[:, :, :, j]))
    return out.reshape(batch, heads, length, v.shape[-1])


def _state_stand_in(q, weighted_k, values_t, log_decay_row, log_decay_col, *, rows, max_concurrent_steps):
    """What linear_2d_mgpu's state kernel computes, in jnp on the same layouts."""
    batch, heads, length, d = q.shape
    slots = length // values_t.shape[2]
    tiles, tile = values_t.shape[0] // (batch * heads), values_t.shape[1]
    chunk = lambda x: x.astype(jnp.float32).reshape(batch, heads, -1, rows, slots, x.shape[-1])
    q_c, k_c = chunk(q), chunk(weighted_k)
    values = values_t.reshape(batch, heads, tiles * tile, -1, rows, slots)  # [B, H, dv, chunks, R, slots]
    distance = jnp.abs(jnp.arange(slots)[:, None] - jnp.arange(slots)[None, :])
    smoothing = jnp.exp(log_decay_col[:, None, None] * distance)
    chunk_decay = jnp.exp(log_decay_row * rows)[None, :, None, None, None]
    state = jnp.zeros((batch, heads, tiles * tile, slots, d), jnp.float32)
    reads = []
    for c in range(q_c.shape[2]):
        reads.append(jnp.einsum("bhrsd,bhesd->bhers", q_c[:, :, c], state))
        fold = jnp.einsum("bhrsd,bhers->bhesd", k_c[:, :, c], values[:, :, :, c])
        state = chunk_decay * state + jnp.einsum("hst,bhetd->bhesd", smoothing, fold)
    return jnp.stack(reads, axis=3).reshape(values_t.shape)


@pytest.mark.parametrize(("grid", "rows", "dv"), [((5, 7), 2, 16), ((9, 64), 1, 20), ((6, 40), 4, 64)])
def test_mosaic_gpu_forward_algorithm_matches_reference(monkeypatch, grid, rows, dv):
    """linear_2d_mgpu.forward with jnp stand-ins for its two kernels (the same layouts, tables and
    split): packing, key weights, the value-tile transposes and the sum of the two parts give the
    reference. The kernels' own numerics need a GPU (benchmarks/linear_2d.py)."""
    from lasadgen_jax.ops.lasad.kernels import linear_2d_mgpu

    monkeypatch.setattr(linear_2d_mgpu, "within_chunks", _within_stand_in)
    monkeypatch.setattr(linear_2d_mgpu, "state_reads", _state_stand_in)
    monkeypatch.setattr(linear_2d_mgpu, "unsupported", lambda *args: "")  # 4-row chunks exceed shared memory
    case = Case("stand_in", batch=2, grid=grid, heads=2, d=16, dv=dv, prefix=0)
    inputs = make_inputs(case, seed=3, dtype=jnp.bfloat16)
    out = linear_2d_mgpu.forward(inputs["q"], inputs["k"], inputs["v"], inputs["log_decay_row"],
                                 inputs["log_decay_col"], grid=grid, rows=rows, max_concurrent_steps=1)
    expected = lasad_attention(inputs["q"], inputs["k"], inputs["v"], grid=grid, variant="2d", impl="reference",
                               log_decay_row=inputs["log_decay_row"], log_decay_col=inputs["log_decay_col"])
    error = rel_error(out, expected)
    assert error < TOLERANCE[jnp.bfloat16], f"relative error {error:.2e}"


def test_triton_value_tile_is_the_widest_that_fills_the_gpu():
    auto = LinearBlocks()
    assert triton_dv_block(auto, batch=8, heads=16, dv=64) == 64       # 128 programs
    assert triton_dv_block(auto, batch=2, heads=16, dv=64) == 16       # 64-wide: 32 programs, 32-wide: 64
    assert triton_dv_block(auto, batch=4, heads=16, dv=64) == 32       # 32-wide: 128 programs
    assert triton_dv_block(LinearBlocks(dv_block=16), batch=8, heads=16, dv=64) == 16
    with pytest.raises(ValueError, match="dv_block"):
        LinearBlocks(dv_block=8)
