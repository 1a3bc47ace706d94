"""The device mesh and the logical-axis rules that place parameters, optimizer state and batches.

Two tables, MaxText-style:
  PARAM_LOGICAL_AXES: parameter path (regex) -> logical axis names, one per dimension;
  rules (config.sharding_rules): logical axis name -> mesh axes (or None: replicated).
The mesh has the axes (data, fsdp, tensor). Batches are split over data x fsdp; parameters are split
over fsdp along their `embed` dimension (ZeRO-3 style: each step gathers them) and over tensor along
heads / mlp / vocab (Megatron style). A >= 2-D parameter that no entry names is an error, and so is
a dimension that its mesh axes do not divide: nothing is replicated silently.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameter paths as "a/b/c" of the pure-dict parameter tree (block indices included).
PARAM_LOGICAL_AXES = (
    (r"token_embedding/embedding$", ("vocab", "embed")),
    (r"class_embedder/embedding/embedding$", ("classes", "embed")),
    (r"attention/(q|k|v|gate)_proj/kernel$", ("embed", "heads")),
    (r"attention/out_proj/kernel$", ("heads", "embed")),
    (r"attention/out_norm_scale$", ("norm_heads", "head_dim")),
    (r"ffn/w[13]/kernel$", ("embed", "mlp")),
    (r"ffn/w2/kernel$", ("mlp", "embed")),
    (r"head/kernel$", ("embed", "vocab")),
)

DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("classes", None),
    ("norm_heads", None),
    ("head_dim", None),
)


# ----------------------------------------------------------------------------- the mesh


def mesh_shape(requested: dict, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) from the config's sizes; one of them may be -1 (= the devices left over)."""
    unknown = set(requested) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(requested.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be >= 1, with at most one -1")
    if -1 in sizes:
        known = math.prod(size for size in sizes if size != -1)
        if num_devices % known:
            raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not a "
                             f"multiple of {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{num_devices} are in use")
    return tuple(sizes)


def make_mesh(requested: dict, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(requested, len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # create_device_mesh knows TPU/GPU topologies; a plain reshape is right for CPU devices and for
        # device subsets it has no layout for.
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


# ----------------------------------------------------------------------------- logical axes


def path_string(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def logical_axes(path: str, ndim: int) -> tuple:
    """The logical axis names of one parameter (None entries: not split)."""
    for pattern, names in PARAM_LOGICAL_AXES:
        if re.search(pattern, path):
            if len(names) != ndim:
                raise ValueError(f"parameter {path}: {ndim} dimensions, the sharding table names {names}")
            return names
    if ndim <= 1:
        return (None,) * ndim  # norm scales, per-head decays: small, replicated
    raise ValueError(f"parameter {path} ({ndim}-D) has no entry in lasadgen_jax.sharding.PARAM_LOGICAL_AXES")


def check_rules(rules) -> dict:
    rules = dict((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)
    for name, axes in rules.items():
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"sharding rule {name!r} -> {axes!r}: {axis!r} is not a mesh axis {MESH_AXES}")
    return rules


def partition_spec(path: str, shape: tuple, mesh: Mesh, rules: dict) -> PartitionSpec:
    """PartitionSpec of one parameter; refuses a dimension its mesh axes do not divide."""
    spec = []
    for dim, name in zip(shape, logical_axes(path, len(shape))):
        axes = None if name is None else rules.get(name)
        if name is not None and name not in rules:
            raise ValueError(f"parameter {path}: logical axis {name!r} has no sharding rule")
        size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None)
        if dim % size:
            raise ValueError(f"parameter {path} {tuple(shape)}: dimension {dim} ({name}) is not divisible by "
                             f"mesh axes {axes} of size {size}; change config.mesh or config.sharding_rules")
        spec.append(axes if size > 1 else None)
    return PartitionSpec(*spec)


def param_shardings(abstract_params, mesh: Mesh, rules) -> dict:
    """NamedSharding for every leaf of a (pure-dict) parameter tree."""
    rules = check_rules(rules)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, partition_spec(path_string(path), leaf.shape, mesh, rules)),
        abstract_params)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dimension split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


# ----------------------------------------------------------------------------- ops XLA cannot partition


def _row_and_head_specs(mesh, batch: int, heads: int, what: str):
    """PartitionSpecs of [batch, seq, heads, e] arrays (batch over data x fsdp, heads over tensor when
    tensor divides them) and of [heads, ...] arrays, for running a Pallas kernel per device."""
    batch_axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names and mesh.shape[axis] > 1)
    shards = math.prod(mesh.shape[axis] for axis in batch_axes)
    if batch % shards:
        raise ValueError(f"{what} on mesh {dict(mesh.shape)}: batch {batch} is not divisible by the "
                         f"mesh's data x fsdp ({shards})")
    tensor = mesh.shape.get("tensor", 1)
    head_axis = "tensor" if tensor > 1 and heads % tensor == 0 else None
    return PartitionSpec(batch_axes or None, None, head_axis, None), PartitionSpec(head_axis)


def per_device_heads(fn, mesh, batch: int, heads: int):
    """`fn(q, k, v, log_decay_row, log_decay_col, prefix_k, prefix_v)` run on each device's part under
    jax.shard_map: batch split over data x fsdp, heads over tensor (when tensor divides them).

    For the Pallas kernels: XLA cannot partition a custom call, so without this every device would
    gather the whole batch and compute all of it. q/k/v/prefix are [batch, seq, heads, d], the log
    decays [heads] (or None); the output is [batch, seq, heads, dv] with the layout of q.
    """
    rows, per_head = _row_and_head_specs(mesh, batch, heads, "the LASAD kernel")

    def call(q, k, v, log_decay_row=None, log_decay_col=None, prefix_k=None, prefix_v=None):
        arrays = {"q": q, "k": k, "v": v, "log_decay_row": log_decay_row, "log_decay_col": log_decay_col,
                  "prefix_k": prefix_k, "prefix_v": prefix_v}
        given = {name: value for name, value in arrays.items() if value is not None}
        specs = {name: per_head if name.startswith("log_decay") else rows for name in given}
        # check_vma=False: a pallas_call's outputs carry no varying-axes type for shard_map to check.
        local = jax.shard_map(lambda parts: fn(**parts), mesh=mesh, in_specs=(specs,), out_specs=rows,
                              check_vma=False)
        return local(given)

    return call


def per_device_head_norm(fn, mesh, batch: int, heads: int):
    """`fn(x, gate, scale)` (the gated head norm's kernels) run on each device's part under jax.shard_map,
    as per_device_heads: x and gate [batch, seq, heads, e], scale [heads, e]; output as x."""
    rows, per_head = _row_and_head_specs(mesh, batch, heads, "the gated head norm kernel")
    scale_spec = PartitionSpec(*per_head, None)
    # check_vma=False as in per_device_heads; scale's gradient is summed over the batch shards by shard_map.
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows, scale_spec), out_specs=rows, check_vma=False)
