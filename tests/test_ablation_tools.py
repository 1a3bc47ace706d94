"""benchmarks/ablation.py's pure parts: the D(a, m) maps it draws, the Inception packing, the batch order."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lasadgen_jax.ops.lasad.reference import lasad_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_ablation():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))   # the script imports ablation_figures beside it
    spec = importlib.util.spec_from_file_location("ablation", os.path.join(REPO, "benchmarks", "ablation.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablation"] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ablation = load_ablation()
import ablation_figures  # noqa: E402  (importable once load_ablation put benchmarks/ on the path)


@pytest.mark.parametrize("variant", ["2d", "2d_row", "1d", "none"])
@pytest.mark.parametrize("grid", [(5, 7), (4, 4)])
def test_decay_map_is_the_reference_decay_of_the_middle_query(variant, grid):
    """With q_a = k_m = 1 (d = 1) and v = one-hot of the key, the reference's output row a is D(a, .)."""
    g_row, g_col = 0.8, 0.6
    n = grid[0] * grid[1]
    a = (grid[0] // 2) * grid[1] + grid[1] // 2
    q = jnp.ones((1, n, 1, 1), jnp.float32)
    v = jnp.eye(n, dtype=jnp.float32)[None, :, None, :]
    out = lasad_reference(q, q, v, grid=grid, variant=variant, log_decay_row=jnp.log(jnp.array([g_row])),
                          log_decay_col=jnp.log(jnp.array([g_col])))
    expected = np.asarray(out)[0, a, 0].reshape(grid)
    np.testing.assert_allclose(ablation_figures.decay_map(variant, g_row, g_col, grid), expected, rtol=1e-5, atol=1e-9)


def test_inception_packing_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"conv/kernel": rng.normal(size=(3, 3, 8, 16)).astype(np.float32) * 1e-3,
              "bn/bias": np.zeros(16, np.float32), "meta/format": np.asarray("x")}
    np.savez(tmp_path / "full.npz", **arrays)
    ablation.pack_inception(str(tmp_path / "full.npz"), str(tmp_path / "packed.npz"))
    ablation.unpack_inception(str(tmp_path / "packed.npz"), str(tmp_path / "back.npz"))
    with np.load(tmp_path / "back.npz") as back:
        assert sorted(back.files) == sorted(arrays)
        assert str(back["meta/format"]) == "x" and back["conv/kernel"].dtype == np.float32
        np.testing.assert_array_equal(back["bn/bias"], arrays["bn/bias"])
        scale = np.abs(arrays["conv/kernel"]).max()   # packed as w / scale with MANTISSA_BITS mantissa bits
        np.testing.assert_allclose(back["conv/kernel"], arrays["conv/kernel"], rtol=0,
                                   atol=scale * 2.0 ** -ablation.MANTISSA_BITS)


def test_mantissa_rounding_is_to_nearest_and_keeps_short_values():
    short = np.asarray([1.0, -0.5, 0.75, 2.0 ** -3 * (1 + 2.0 ** -ablation.MANTISSA_BITS)], np.float16)
    np.testing.assert_array_equal(ablation.round_mantissa(short), short)
    ulp = 2.0 ** -ablation.MANTISSA_BITS           # of values in [1, 2), here just under 1: half of it
    below_half = np.asarray([0.5 + 0.5 * ulp * 0.25], np.float16)     # a quarter of the kept ulp above 0.5
    above_half = np.asarray([0.5 + 0.5 * ulp * 0.75], np.float16)
    assert ablation.round_mantissa(below_half)[0] == np.float16(0.5)
    assert ablation.round_mantissa(above_half)[0] == np.float16(0.5 + 0.5 * ulp)


def test_batch_order_visits_each_example_once_per_epoch():
    order = ablation.batch_order(num_examples=10, batch_size=3, num_steps=7, seed=0)
    assert order.shape == (7, 3)
    for epoch in range(2):   # 3 batches of 3 per epoch, the 10th example dropped
        seen = order[3 * epoch:3 * epoch + 3].ravel()
        assert len(set(seen.tolist())) == 9
    np.testing.assert_array_equal(order, ablation.batch_order(10, 3, 7, seed=0))
    assert not np.array_equal(order, ablation.batch_order(10, 3, 7, seed=1))
