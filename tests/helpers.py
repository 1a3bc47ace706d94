"""Shared test helpers: random LASAD inputs, a norm-wise relative error and the gradient check of
the LASAD kernels, a tiny LASADGen, launchers of jax.distributed subprocesses."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig


@dataclasses.dataclass(frozen=True)
class Case:
    """One input shape: batch, grid (h, w), heads, key dim d, value dim dv, prefix length P."""

    name: str
    batch: int
    grid: tuple[int, int]
    heads: int
    d: int
    dv: int
    prefix: int

    def __str__(self):
        return self.name


def free_port() -> int:
    """A TCP port free on localhost now (for a jax.distributed coordinator of subprocesses)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# How long XLA:CPU lets a collective wait for its fake-device threads before it aborts the process
# (XLA's default: 40 s). Two test workers on two cores can starve one fake device's thread that long.
COLLECTIVE_TIMEOUT_SECONDS = 600


def fake_devices_flags(count: int) -> str:
    """XLA_FLAGS for a subprocess of `count` fake CPU devices, with the patient collective timeout."""
    return (f"--xla_force_host_platform_device_count={count} "
            f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TIMEOUT_SECONDS}")


def launch_processes(command, log_dir, num_processes=2, devices_per_process=2) -> list:
    """Starts num_processes copies of `command` (from the repository root) joined by jax.distributed, configured
    through the environment as launch/gpu sets it, each with devices_per_process CPU devices and its output in
    log_dir/process_<index>.log; returns the running processes (finish_processes waits for them)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = free_port()
    processes = []
    for index in range(num_processes):
        environment = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu",
                           JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
                           JAX_PROCESS_ID=str(index),
                           XLA_FLAGS=fake_devices_flags(devices_per_process))
        with open(os.path.join(log_dir, f"process_{index}.log"), "w") as log:
            processes.append(subprocess.Popen(command, cwd=repo, env=environment, stdout=log,
                                              stderr=subprocess.STDOUT))
    return processes


def finish_processes(processes, log_dir, timeout: float = 300) -> list[str]:
    """Waits for every process of launch_processes (killing all of them at the deadline), asserts each exited 0
    and returns their outputs."""
    deadline = time.time() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            for other in processes:
                other.wait()
            break
    outputs = []
    for index in range(len(processes)):
        with open(os.path.join(log_dir, f"process_{index}.log")) as f:
            outputs.append(f.read())
    for index, process in enumerate(processes):
        assert process.returncode == 0, f"process {index} exited {process.returncode}:\n{outputs[index][-4000:]}"
    return outputs


def start_processes(command, log_dir, num_processes=2, devices_per_process=2, timeout=300) -> list[str]:
    """launch_processes, then finish_processes: the outputs of processes that all exited 0."""
    return finish_processes(launch_processes(command, log_dir, num_processes, devices_per_process), log_dir, timeout)


def make_inputs(case: Case, seed: int, dtype=jnp.float32, log_decay_range=(-1.0, -0.05)):
    """Fresh random q, k, v, log decays and prefix for `case` as a dict of lasad_attention kwargs."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    n = case.grid[0] * case.grid[1]
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    low, high = log_decay_range
    inputs = dict(
        q=normal(keys[0], (case.batch, n, case.heads, case.d)),
        k=normal(keys[1], (case.batch, n, case.heads, case.d)),
        v=normal(keys[2], (case.batch, n, case.heads, case.dv)),
        log_decay_row=jax.random.uniform(keys[3], (case.heads,), minval=low, maxval=high),
        log_decay_col=jax.random.uniform(keys[4], (case.heads,), minval=low, maxval=high),
        prefix_k=None,
        prefix_v=None,
    )
    if case.prefix:
        inputs["prefix_k"] = normal(keys[5], (case.batch, case.prefix, case.heads, case.d))
        inputs["prefix_v"] = normal(keys[6], (case.batch, case.prefix, case.heads, case.dv))
    return inputs


def rel_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), "non-finite values in the result under test"
    scale = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    return float(diff / scale) if scale > 0 else float(diff)


DIFF_ARGS = ("q", "k", "v", "log_decay_row", "log_decay_col", "prefix_k", "prefix_v")  # lasad_attention's


def magnitude_inputs(inputs: dict) -> dict:
    """lasad_attention kwargs with every array but the log decays by magnitude: the reference's
    gradients there (with the cotangent by magnitude too) bound the sum of the terms' magnitudes."""
    absolute = {name: None if x is None or name.startswith("log_") else jnp.abs(x) for name, x in inputs.items()}
    absolute.update(log_decay_row=inputs["log_decay_row"], log_decay_col=inputs["log_decay_col"])
    return absolute


def assert_gradients_close(actual: dict, expected: dict, inputs: dict, tolerance: float, decay_scale=None,
                           unused=()):
    """Every gradient of the DIFF_ARGS present in `inputs`: the input's shape and dtype, and a
    norm-wise relative error against `expected` below tolerance. Names in `unused` must be exactly 0.

    decay_scale (bf16 checks): the reference's gradients at magnitude_inputs with the cotangent by
    magnitude. Each log-decay gradient is one sum over all pairs of terms of both signs, and in bf16
    its error scales with the terms, not with the (possibly much smaller) sum: it is measured
    against decay_scale's gradient instead.
    """
    for name in DIFF_ARGS:
        if inputs[name] is None:
            continue
        chex.assert_equal_shape([actual[name], inputs[name]])
        chex.assert_type(actual[name], inputs[name].dtype)
        if name in unused:
            np.testing.assert_array_equal(actual[name], 0.0, err_msg=f"{name} is unused")
            continue
        if decay_scale is not None and name.startswith("log_"):
            diff = np.linalg.norm(np.asarray(actual[name], np.float64) - np.asarray(expected[name], np.float64))
            error = diff / np.linalg.norm(np.asarray(decay_scale[name], np.float64))
        else:
            error = rel_error(actual[name], expected[name])
        assert error < tolerance, f"d{name}: relative error {error:.2e} >= {tolerance}"


def tiny_model(attention, grid=(4, 4), num_prefix=1, seed=0, **overrides):
    """A 2-block model whose zero-initialised head is replaced by random weights (non-trivial logits)."""
    config = ModelConfig(
        vocab_size=40, num_classes=5, grid=grid, dim=32, depth=2, num_heads=2, attention=attention,
        num_prefix=num_prefix, **overrides,
    )
    model = LASADGen(config, rngs=nnx.Rngs(seed))
    model.head.kernel[...] = jax.random.normal(jax.random.PRNGKey(seed + 1), model.head.kernel.shape)
    model.eval()
    return model


def tiny_vq_architecture():
    """A complete but tiny VQ (two downsamples: 16x16 images -> 4x4 codes of 64) for fast tests."""
    from lasadgen_jax.tokenizer import VQArchitecture

    return VQArchitecture(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1, z_channels=8,
                          codebook_size=64, codebook_dim=4, num_groups=4)


def write_synthetic_token_dir(directory, *, grid=(4, 4), codebook_size=64, num_classes=4, num_records=64,
                              num_crops=2, shard_size=32, seed=0) -> str:
    """A finished token directory (shards + manifest, as extraction leaves it) of learnable records:
    each class has its own token pattern, varied per record and crop by random substitutions."""
    import os

    from array_record.python.array_record_module import ArrayRecordWriter

    from lasadgen_jax.data import extract, records
    from lasadgen_jax.data import manifest as manifests

    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    patterns = rng.integers(0, codebook_size, size=(num_classes, n))
    os.makedirs(directory, exist_ok=True)
    ranges = extract.shard_ranges(num_records, shard_size)
    code_bytes = records.code_bytes_for(codebook_size)
    spec = {"tokenizer_hash": "synthetic", "grid": list(grid), "codebook_size": codebook_size,
            "code_bytes": code_bytes, "crops": "synthetic", "num_crops": num_crops, "image_size": 0,
            "source": "synthetic", "num_images": num_records, "num_classes": num_classes, "shard_size": shard_size}
    for index, (start, stop) in enumerate(ranges):
        path = os.path.join(directory, manifests.shard_name(index, len(ranges)))
        writer = ArrayRecordWriter(path, "group_size:1")
        for record_id in range(start, stop):
            label = record_id % num_classes
            codes = np.repeat(patterns[label][None], num_crops, axis=0)
            noise = rng.random(codes.shape) < 0.2
            codes = np.where(noise, rng.integers(0, codebook_size, size=codes.shape), codes)
            writer.write(records.encode_record(codes, label, code_bytes))
        writer.close()
        manifests.write_json_atomically(manifests.sidecar_path(path), {
            "spec": spec, "file": os.path.basename(path), "records": stop - start, "skipped": 0})
    assert extract.write_manifest_if_complete(str(directory), spec, len(ranges)) is not None
    return str(directory)


def teacher_forced_logits(model, tokens, labels):
    """Logits [batch, N, vocab] of decoding `tokens` one cell at a time (prefill, then decode_step)."""
    state = model.init_decode_state(tokens.shape[0])
    step = nnx.jit(lambda m, previous, s, cell: m.decode_step(previous, s, cell))
    logits, state = nnx.jit(lambda m, labels, s: m.prefill(labels, s))(model, labels, state)
    all_logits = [logits]
    for cell in range(1, tokens.shape[1]):
        logits, state = step(model, tokens[:, cell - 1], state, cell)
        all_logits.append(logits)
    return jnp.stack(all_logits, axis=1)
