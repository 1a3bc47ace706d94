"""models/dropout.py: four keep decisions per threefry hash, against the rates and independence a
dropout mask must have, and the module's train/eval behaviour."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lasadgen_jax.models.dropout import Dropout, drop_threshold, keep_mask, uniform16


def binomial_sigmas(count, trials, p):
    return abs(count - trials * p) / np.sqrt(trials * p * (1 - p))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("shape", [(1, 1023), (3, 5, 7), (2, 257, 1), (64, 1024)])
def test_the_drop_rate_is_the_rate_rounded_to_16_bits(impl, shape):
    rate = 0.1
    mask = np.asarray(keep_mask(jax.random.key(np.random.randint(2**31), impl=impl), rate, shape))
    assert mask.shape == shape and mask.dtype == bool
    p_drop = drop_threshold(rate) / 2**16
    assert abs(p_drop - rate) < 2**-17
    assert binomial_sigmas((~mask).sum(), mask.size, p_drop) < 5


def test_the_four_lanes_of_a_hash_are_uniform_and_independent():
    """The 16-bit uniforms of each lane (position mod 4 along the last axis) fill 16 bins evenly, and the
    drop decisions of neighbouring lanes (same hash) coincide as often as independent ones would."""
    u = np.asarray(uniform16(jax.random.key(np.random.randint(2**31)), (512, 1024))).astype(np.int64)
    for lane in range(4):
        counts = np.bincount(u[:, lane::4].ravel() >> 12, minlength=16)
        expected = counts.sum() / 16
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 50, (lane, counts)    # 15 degrees of freedom: p < 1e-5
    dropped = u < drop_threshold(0.25)
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3), (3, 4)]:    # (3, 4): the last lane and the next hash
        first = dropped[:, a:-4:4]
        second = dropped[:, b::4][:, : first.shape[1]]
        both = (first & second).sum()
        assert binomial_sigmas(both, first.size, 0.25**2) < 5, (a, b, both)


def test_the_mask_is_a_function_of_the_key():
    shape = (4, 9, 33)
    a, b = jax.random.key(1), jax.random.key(2)
    chex.assert_trees_all_equal(keep_mask(a, 0.3, shape), keep_mask(a, 0.3, shape))
    assert not np.array_equal(keep_mask(a, 0.3, shape), keep_mask(b, 0.3, shape))
    chex.assert_trees_all_equal(jax.jit(lambda k: keep_mask(k, 0.3, shape))(a), keep_mask(a, 0.3, shape))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_module_drops_scales_and_differentiates_in_training_only(dtype):
    rate = 0.25
    x = jax.random.normal(jax.random.key(np.random.randint(2**31)), (2, 7, 12), dtype)
    dropout = Dropout(rate, rngs=nnx.Rngs(dropout=3))
    y = dropout(x)
    kept = np.asarray(y) != 0
    scaled = (np.asarray(x, np.float32) * np.float32(1 / (1 - rate))).astype(dtype)
    np.testing.assert_array_equal(np.asarray(y)[kept], scaled[kept])
    assert 0 < (~kept).sum() < kept.size
    assert not np.array_equal(np.asarray(dropout(x)) != 0, kept), "a second call must draw a new mask"

    grad = nnx.grad(lambda module, x: module(x).astype(jnp.float32).sum(), argnums=1)(Dropout(rate, rngs=nnx.Rngs(
        dropout=3)), x)
    mask = np.asarray(Dropout(rate, rngs=nnx.Rngs(dropout=3))(x)) != 0
    np.testing.assert_allclose(np.asarray(grad, np.float32), mask / (1 - rate), rtol=1e-2)

    dropout.eval()
    chex.assert_trees_all_equal(dropout(x), x)
    chex.assert_trees_all_equal(Dropout(0.0, rngs=nnx.Rngs(dropout=0))(x), x)
    chex.assert_trees_all_equal(Dropout(rate, rngs=nnx.Rngs(dropout=0))(x, deterministic=True), x)


def test_bad_rates_and_keys_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
        Dropout(1.0, rngs=nnx.Rngs(dropout=0))
    with pytest.raises(TypeError, match="typed PRNG key"):
        keep_mask(jax.random.PRNGKey(0), 0.1, (4,))
    with pytest.raises(ValueError, match="at least one axis"):
        keep_mask(jax.random.key(0), 0.1, ())


def count_mask_draws(remat: str, depth: int = 2) -> int:
    """Dropout masks drawn by one gradient of a small model: their optimization barriers in the jaxpr."""
    from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig

    config = ModelConfig(depth=depth, num_heads=2, dim=32, vocab_size=64, num_classes=4, grid=(3, 5), remat=remat)
    graphdef, state = nnx.split(LASADGen(config, rngs=nnx.Rngs(0, dropout=1)))
    tokens, labels = jnp.zeros((2, 15), jnp.int32), jnp.zeros((2,), jnp.int32)

    def gradient(state):
        return nnx.grad(lambda model: model(tokens, labels).mean())(nnx.merge(graphdef, state))

    return str(jax.make_jaxpr(gradient)(state)).count("optimization_barrier")


def test_remat_dots_keeps_the_dropout_masks_for_the_backward():
    """remat="dots" keeps each mask from the forward (token dropout + two per block); "full" draws
    masks again when it recomputes the blocks."""
    assert count_mask_draws("dots") == 1 + 2 * 2
    assert count_mask_draws("full") > 1 + 2 * 2
