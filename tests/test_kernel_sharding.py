"""The Pallas kernels under a mesh of several devices: run per device under shard_map, same numbers.

XLA cannot partition a Pallas custom call, so on a multi-device mesh the trainer's step sets the
mesh (jax.set_mesh) and LASADAttention runs the kernel per device (sharding.per_device_heads, and its gated
norm's kernels through sharding.per_device_head_norm):
batch over data x fsdp, heads over tensor. These checks run in a subprocess with 8 fake CPU devices,
the kernels in Pallas interpret mode (the GPU/Triton body), against the unsharded computation.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import fake_devices_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One xdist worker runs every test of 8 fake devices, one at a time (tests/run.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("fake_devices")

SCRIPT = r'''
import functools, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax import nnx
from lasadgen_jax import sharding
from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad.reference import lasad_reference

mode, variant, kernel_impl = sys.argv[1], sys.argv[2], sys.argv[3]
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
rel = lambda a, b: float(jnp.linalg.norm(jnp.ravel(a) - jnp.ravel(b)) / jnp.linalg.norm(jnp.ravel(b)))

if mode == "op":
    grid, batch, heads, d, prefix = (3, 5), 4, 4, 16, 1
    keys = jax.random.split(jax.random.PRNGKey(0), 7)
    inputs = dict(q=jax.random.normal(keys[0], (batch, 15, heads, d)) * d**-0.5,
                  k=jax.random.normal(keys[1], (batch, 15, heads, d)),
                  v=jax.random.normal(keys[2], (batch, 15, heads, d)),
                  log_decay_row=jax.random.uniform(keys[3], (heads,), minval=-0.7, maxval=-0.05),
                  log_decay_col=jax.random.uniform(keys[4], (heads,), minval=-0.7, maxval=-0.05),
                  prefix_k=jax.random.normal(keys[5], (batch, prefix, heads, d)),
                  prefix_v=jax.random.normal(keys[6], (batch, prefix, heads, d)))
    if kernel_impl == "pallas":
        kernel = functools.partial(lasad.lasad_attention_pallas, grid=grid, variant=variant, backend="gpu",
                                   interpret=True)
    else:  # 16-token tiles: the 15 cells span one tile, with the padded end
        kernel = functools.partial(lasad.lasad_attention_parallel, grid=grid, variant=variant, interpret=True,
                                   blocks=lasad.ParallelBlocks(block=16))
    sharded = sharding.per_device_heads(kernel, mesh, batch, heads)
    loss = lambda f: (lambda x: jnp.sum(f(**x) ** 2))
    reference = functools.partial(lasad_reference, grid=grid, variant=variant)
    rows = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    by_heads = NamedSharding(mesh, P("tensor"))
    placed = {n: jax.device_put(x, rows if x.ndim == 4 else by_heads) for n, x in inputs.items()}
    jaxpr = str(jax.make_jaxpr(lambda x: sharded(**x))(placed))
    assert "shard_map" in jaxpr, "per_device_heads did not shard_map"
    out = jax.jit(lambda x: sharded(**x))(placed)
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor", None), out.sharding
    print("forward", rel(out, reference(**inputs)))
    grads = jax.jit(jax.grad(loss(sharded)))(placed)
    expected = jax.grad(loss(reference))(inputs)
    print("grads", max(rel(grads[n], expected[n]) for n in inputs))
    try:
        sharding.per_device_heads(kernel, mesh, 2, heads)
    except ValueError as error:
        assert "batch 2 is not divisible" in str(error), error
        print("refused")
else:  # the model: LASADAttention(impl=kernel_impl) under the trainer's mesh vs impl="chunked" on one device
    original = lasad.lasad_attention

    def with_interpret(q, k, v, *, impl, **kwargs):   # the GPU kernel body, interpreted on CPU
        if impl == "pallas":
            return lasad.lasad_attention_pallas(q, k, v, backend="gpu", interpret=True, **kwargs)
        if impl == "pallas_parallel":
            return lasad.lasad_attention_parallel(q, k, v, interpret=True, **kwargs)
        if impl == "pallas_linear":
            return lasad.lasad_attention_linear(q, k, v, interpret=True, **kwargs)
        if impl == "pallas_row_blocks":
            return lasad.lasad_attention_row_blocks(q, k, v, interpret=True, **kwargs)
        return original(q, k, v, impl=impl, **kwargs)

    lasad.lasad_attention = with_interpret
    lasad.resolve_impl = lambda impl, variant=None, backend=None, tokens=None: impl
    from lasadgen_jax.ops import gated_norm
    original_norm = gated_norm.gated_head_norm

    def norm_with_interpret(x, gate, scale, *, impl, **kwargs):   # the gated norm's kernels, interpreted
        if impl == "pallas":
            return gated_norm.gated_head_norm_pallas(x, gate, scale, interpret=True,
                                                     blocks=gated_norm.GatedNormBlocks(16), **kwargs)
        return original_norm(x, gate, scale, impl=impl, **kwargs)

    gated_norm.gated_head_norm = norm_with_interpret
    from lasadgen_jax.models.lasad_attention import LASADAttention

    # dim 64 and 4 heads: head dim 16, which the gated norm's kernels tile; the kernel model runs them
    make = lambda impl, norm: LASADAttention(64, 4, variant=variant, impl=impl, gated_norm_impl=norm,
                                             rngs=nnx.Rngs(0))
    # pallas_row_blocks: 17 rows, two blocks of 16, so that its column sweeps run too
    grid = (17, 2) if kernel_impl == "pallas_row_blocks" else (3, 5)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, grid[0] * grid[1], 64))
    def loss(model, x):
        return jnp.sum(model(x, grid=grid, num_prefix=1) ** 2)
    expected_loss, expected = nnx.value_and_grad(loss)(make("chunked", "xla"), x)
    model = make(kernel_impl, "pallas")
    step = nnx.jit(nnx.value_and_grad(loss))
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(lambda m, x: loss(m, x))(model, x))
        got_loss, got = step(model, jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))))
    assert jaxpr.count("shard_map") >= 2, "the model did not shard_map its kernels"
    assert "gated_head_norm_forward" in jaxpr, "the gated norm's kernels did not run"
    flat_got, flat_expected = nnx.to_flat_state(got), dict(nnx.to_flat_state(expected))
    print("loss", rel(got_loss, expected_loss))
    print("grads", max(rel(value[...], flat_expected[path][...]) for path, value in flat_got))
    without_mesh = str(jax.make_jaxpr(lambda m, x: loss(m, x))(model, x))
    assert "shard_map" not in without_mesh
    print("ok")
'''


def run(mode: str, variant: str, kernel_impl: str = "pallas") -> dict:
    env = dict(os.environ, XLA_FLAGS=fake_devices_flags(8), JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, variant, kernel_impl], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    values = {}
    for line in result.stdout.splitlines():
        name, *value = line.split()
        values[name] = float(value[0]) if value else True
    return values


# The parallel-form kernel goes through the same per_device_heads; its mesh run is the model test below.
@pytest.mark.parametrize("variant, kernel_impl", [("2d_row", "pallas"), ("2d", "pallas")])
def test_kernel_per_device_on_a_2x2x2_mesh_matches_the_reference(variant, kernel_impl):
    values = run("op", variant, kernel_impl)
    assert values["forward"] < 1e-4 and values["grads"] < 1e-4 and values["refused"], values


@pytest.mark.parametrize("variant, kernel_impl", [("1d", "pallas"), ("2d", "pallas_parallel"), ("2d", "pallas_linear"),
                                                  ("2d", "pallas_row_blocks")])
def test_model_runs_its_kernel_per_device_under_the_trainers_mesh(variant, kernel_impl):
    values = run("model", variant, kernel_impl)
    assert values["loss"] < 1e-4 and values["grads"] < 1e-4 and values["ok"], values


def test_mosaic_gpu_kernels_lower_per_device_under_shard_map():
    """The Mosaic GPU kernels (the default on a Hopper) inside per_device_heads' shard_map, forward
    and backward, pass lowering for CUDA on the CPU (they have no interpret mode to run here)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from lasadgen_jax import sharding
    from lasadgen_jax.ops.lasad import ChunkOptions, lasad_attention_pallas

    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    op = functools.partial(lasad_attention_pallas, grid=(4, 32), variant="1d", backend="gpu",
                           options=ChunkOptions(gpu_lowering="mosaic"))
    x = jnp.ones((2, 128, 4, 64), jnp.bfloat16)
    decays = -0.1 * jnp.ones((4,))
    per_device = sharding.per_device_heads(op, mesh, batch=2, heads=4)
    grad = jax.jit(jax.grad(lambda q: jnp.sum(per_device(q, x, x, decays, decays).astype(jnp.float32))))
    triton = "__gpu$xla.gpu.triton"
    module = jax.export.export(grad, platforms=["cuda"],
                               disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(x).mlir_module()
    assert "shard_map" in str(jax.make_jaxpr(grad)(x))
    assert module.count("mosaic_gpu") >= 1
