"""Tokenizer encoding jitted once and split over every local device (data parallel, params replicated).

Each host encodes only its own images, so the mesh holds this process's devices: no collective
crosses hosts. Every call is padded to one fixed number of images (a multiple of the device count),
so the encoder compiles once however the last batch of a shard falls; the jitted function takes the
model's graphdef as a static argument, so encoders of the same architecture share compilations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lasadgen_jax.tokenizer.model import VQModel


@functools.partial(jax.jit, static_argnums=0)
def encode_uint8(graphdef, state, images_uint8):
    """Codes of uint8 images; the output stays sharded like the input (data parallel)."""
    return nnx.merge(graphdef, state).encode(images_uint8.astype(jnp.float32) / 127.5 - 1.0)


class ShardedEncoder:
    """encoder(images uint8 [n, H, W, 3], n <= capacity) -> codes int32 [n, h, w] as numpy."""

    def __init__(self, model: VQModel, images_per_call: int, devices=None):
        devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = Mesh(np.array(devices), ("data",))
        self.capacity = -(-images_per_call // len(devices)) * len(devices)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        count = len(images)
        if count > self.capacity:
            raise ValueError(f"ShardedEncoder got {count} images, more than its capacity {self.capacity}")
        padded = np.zeros((self.capacity,) + images.shape[1:], np.uint8)
        padded[:count] = images
        codes = encode_uint8(self.graphdef, self.state, jax.device_put(padded, self.batch_sharding))
        return np.asarray(codes)[:count]
