"""What every LASAD kernel family shares: backend names, the default backend, head-dim padding,
the decay table the kernels read, and a `pallas_call` that can poison its outputs for checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lasadgen_jax.ops.lasad.chunk_math import next_power_of_two

BACKENDS = ("gpu", "tpu")
PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
TPU_LANES = 128  # Mosaic TPU tiles the last dim by 128 lanes

# How each kernel entry of `lasad_attention` can run on CPU instead (interpret mode).
_INTERPRET_ENTRIES = {
    "pallas": "lasad_attention_pallas(..., backend=..., interpret=True) to run the kernels",
    "pallas_parallel": "lasad_attention_parallel(..., interpret=True) to run the kernel",
    "pallas_linear": "lasad_attention_linear(..., interpret=True) to run the kernel",
    "pallas_row_blocks": "lasad_attention_row_blocks(..., interpret=True) to run the kernels",
}


def backend_name(platform: str) -> str:
    """'cpu', 'gpu' or 'tpu' for a jax platform name; raises for any other platform."""
    if platform not in PLATFORMS:
        raise ValueError(f"LASAD knows the platforms {sorted(PLATFORMS)}, got {platform!r}; pass impl explicitly")
    return PLATFORMS[platform]


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def default_backend(impl: str = "pallas") -> str:
    """The kernel backend of jax's default device for a kernel `impl` (lasad.KERNEL_IMPLS); raises on
    CPU (no silent fallback)."""
    platform = jax.default_backend()
    if platform in PLATFORMS and backend_name(platform) in BACKENDS:
        return backend_name(platform)
    raise ValueError(
        f"impl={impl!r} needs a GPU or TPU, but jax's default backend is {platform!r}; use "
        f"impl='chunked' (or 'auto'), or {_INTERPRET_ENTRIES[impl]} in interpret mode"
    )


def padded_dim(backend: str, size: int) -> int:
    """A head dim padded to what the backend's kernels tile: a power of two >= 16 on GPU, a
    multiple of 128 lanes on TPU."""
    if backend == "gpu":
        return next_power_of_two(max(16, size))
    return -(-size // TPU_LANES) * TPU_LANES


def pad_last(x, size: int):
    """x zero-padded along its last axis to `size`."""
    return x if x.shape[-1] == size else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, size - x.shape[-1]),))


def stack_decays(log_decay_row, log_decay_col):
    """[H, 2] float32 (log row, log col): the decay table every kernel reads per head."""
    return jnp.stack([log_decay_row, log_decay_col], axis=1).astype(jnp.float32)


def is_hopper() -> bool:
    """Whether jax's first GPU is an NVIDIA Hopper (compute capability 9.x); False without one."""
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:  # no GPU backend (e.g. exporting for CUDA on a CPU)
        return False
    return str(getattr(device, "compute_capability", "")).startswith("9.")


def call_with_poison(kernel, inputs, *, out_shape, out_spec, poison: bool, **kwargs):
    """pallas_call; with poison=True every output buffer starts as NaN (aliased in), so an element
    the kernel fails to write shows up as NaN (the full-size GPU checks use this). out_shape and
    out_spec: one output, or lists of several."""
    in_specs = kwargs.pop("in_specs")
    if not poison:
        return pl.pallas_call(kernel, out_shape=out_shape, in_specs=in_specs, out_specs=out_spec, **kwargs)(*inputs)
    several = isinstance(out_shape, (list, tuple))
    shapes, specs = (list(out_shape), list(out_spec)) if several else ([out_shape], [out_spec])
    poisoned = [jnp.full(shape.shape, jnp.nan, shape.dtype) for shape in shapes]
    count = len(inputs)
    skip_alias = lambda *refs: kernel(*refs[:count], *refs[count + len(shapes):])
    return pl.pallas_call(
        skip_alias, out_shape=out_shape, in_specs=[*in_specs, *specs], out_specs=out_spec,
        input_output_aliases={count + i: i for i in range(len(shapes))}, **kwargs,
    )(*inputs, *poisoned)
