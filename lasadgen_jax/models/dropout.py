"""Dropout with four keep decisions from each threefry hash.

flax's `nnx.Dropout` draws its mask with `jax.random.bernoulli`: one threefry2x32 hash (20 rounds of
32-bit integer work) per element, the hash's two output words XORed into one, which makes the masks
the largest elementwise work of the L training step (RESULTS, "Training step: dropout's random
bits"). Here one hash of a counter gives two 32-bit words, i.e. four 16-bit uniforms u, each
deciding one element: the element is kept when u >= round(rate * 2**16). The drop probability is
thus `rate` rounded to a multiple of 2**-16 (0.1 -> 0.100006); kept elements are scaled by
1 / (1 - rate) in float32.

The hash words pass through `jax.lax.optimization_barrier`, so XLA writes them once (2 bytes per
element) instead of fusing the hash into the masking, where each element would recompute the hash
of its group of four. Keys of another implementation (`rbg`, `unsafe_rbg`) draw the 16-bit uniforms
with `jax.random.bits`.

The mask is named KEEP_MASK_NAME for `jax.checkpoint` policies: `remat="dots"` keeps it (1 byte per
element) rather than drawing it again in the backward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.extend.random import threefry2x32_p

from lasadgen_jax.models.remat_names import KEEP_MASK_NAME

UNIFORM_BITS = 16
LANES_PER_HASH = 2 * 32 // UNIFORM_BITS   # a threefry2x32 hash gives two 32-bit words


def drop_threshold(rate: float) -> int:
    """The 16-bit threshold below which an element is dropped: round(rate * 2**16)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return int(round(rate * 2**UNIFORM_BITS))


def _flat_index(shape) -> jax.Array:
    """uint32 row-major index of every element of `shape`, built from per-axis iotas (elementwise, so
    XLA's partitioner shards it like the array it indexes)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    return index


def _threefry_uniform16(key, shape) -> jax.Array:
    """uint16 uniforms of `shape`: four from each threefry2x32 hash of the hash's flat index."""
    groups = -(-shape[-1] // LANES_PER_HASH)
    hash_shape = (*shape[:-1], groups)
    if math.prod(hash_shape) >= 2**32:
        raise ValueError(f"dropout mask of shape {tuple(shape)} needs more than 2**32 hashes")
    key_words = jax.random.key_data(key)
    counts = _flat_index(hash_shape)
    words = threefry2x32_p.bind(key_words[0], key_words[1], jnp.zeros_like(counts), counts)
    words = jax.lax.optimization_barrier(tuple(words))
    low_mask = np.uint32(2**UNIFORM_BITS - 1)
    lanes = [lane for word in words for lane in (word & low_mask, word >> np.uint32(UNIFORM_BITS))]
    uniforms = jnp.stack(lanes, axis=-1).reshape(*shape[:-1], groups * LANES_PER_HASH)
    return uniforms[..., : shape[-1]].astype(jnp.uint16)


def uniform16(key, shape) -> jax.Array:
    """uint16 uniforms of `shape` (at least one axis) from a typed PRNG key."""
    if not jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        raise TypeError(f"dropout needs a typed PRNG key (jax.random.key), got {getattr(key, 'dtype', type(key))}")
    if not shape:
        raise ValueError("dropout needs an input with at least one axis, got a scalar")
    if str(jax.random.key_impl(key)) == "threefry2x32":
        return _threefry_uniform16(key, tuple(shape))
    return jax.random.bits(key, tuple(shape), jnp.uint16)


def keep_mask(key, rate: float, shape) -> jax.Array:
    """bool `shape`: True where an element is kept, each with probability 1 - round(rate * 2**16) / 2**16."""
    return uniform16(key, shape) >= np.uint16(drop_threshold(rate))


class Dropout(nnx.Dropout):
    """`nnx.Dropout`'s module (same state, `train()`/`eval()` and `deterministic` handling) with the
    mask drawn by `keep_mask`. Takes no broadcast_dims."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        drop_threshold(rate)
        super().__init__(rate, rngs=rngs)

    def __call__(self, inputs, *, deterministic: bool | None = None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if self.rate == 0.0 or deterministic:
            return inputs
        keep = checkpoint_name(keep_mask(self.rngs(), self.rate, inputs.shape), KEEP_MASK_NAME)
        scaled = (inputs.astype(jnp.float32) * (1.0 / (1.0 - self.rate))).astype(inputs.dtype)
        return jnp.where(keep, scaled, jnp.zeros_like(inputs))
