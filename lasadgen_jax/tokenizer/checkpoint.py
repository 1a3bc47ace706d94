"""The tokenizer's on-disk form: a directory with `tokenizer.json` (architecture) and `params.npz`.

One format for every producer (the PyTorch converter, the small-VQ trainer's export) and every
consumer (token extraction, sampling). Parameters are plain float32 arrays keyed by their path in
the NNX tree joined with '/', loaded with `allow_pickle=False`. The directory is written next to
its destination and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from lasadgen_jax.tokenizer.architecture import VQArchitecture
from lasadgen_jax.tokenizer.model import VQModel, abstract_vq_model

FORMAT = "lasadgen_jax.tokenizer/1"
SPEC_FILE = "tokenizer.json"
PARAMS_FILE = "params.npz"


def flat_params(model: VQModel) -> dict[str, np.ndarray]:
    """Every nnx.Param of the model as {'encoder/conv_in/kernel': float32 array, ...}."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(part) for part in path): np.asarray(jax.device_get(variable[...]), np.float32)
            for path, variable in flat}


def param_shapes(model: VQModel) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every nnx.Param, for concrete and abstract (`abstract_vq_model`) models alike."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(part) for part in path): tuple(variable.shape) for path, variable in flat}


def load_flat_params(model: VQModel, params: dict[str, np.ndarray], source: str) -> None:
    """Set every nnx.Param of `model` (possibly abstract) from `params`; names and shapes must match exactly."""
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    expected = {"/".join(str(part) for part in path): variable for path, variable in flat}
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: parameters do not match the architecture; "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for name, variable in expected.items():
        value = params[name]
        if value.shape != variable.shape:
            raise ValueError(f"{source}: parameter {name} has shape {value.shape}, the architecture needs "
                             f"{variable.shape}")
        variable.set_value(jax.numpy.asarray(value, np.float32))
    nnx.update(model, state)


def save_tokenizer(model: VQModel, directory: str, image_size: int | None = None) -> str:
    """Write the tokenizer directory atomically; returns its hash (see `tokenizer_hash`). image_size: the
    side of the images it was trained at, recorded for token extraction's default (not part of the hash)."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **flat_params(model))
    params_bytes = buffer.getvalue()
    spec = {"format": FORMAT, "architecture": json.loads(model.arch.to_json()),
            "params_sha256": hashlib.sha256(params_bytes).hexdigest()}
    if image_size is not None:
        model.arch.grid(int(image_size))  # a size the tokenizer cannot encode is refused here
        spec["image_size"] = int(image_size)
    staging = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    try:
        with open(os.path.join(staging, PARAMS_FILE), "wb") as f:
            f.write(params_bytes)
        with open(os.path.join(staging, SPEC_FILE), "w") as f:
            json.dump(spec, f, indent=1, sort_keys=True)
        if os.path.exists(directory):
            read_spec(directory)  # only ever replace another tokenizer directory, never anything else
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return tokenizer_hash(directory)


def read_spec(directory: str) -> dict:
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} is not a tokenizer directory: {SPEC_FILE} is missing "
                         f"(make one with `python -m lasadgen_jax.tokenizer.convert` or the tokenizer trainer)")
    with open(path) as f:
        spec = json.load(f)
    if spec.get("format") != FORMAT:
        raise ValueError(f"{path}: format {spec.get('format')!r} is not {FORMAT!r}")
    return spec


def trained_image_size(directory: str) -> int | None:
    """The image side the tokenizer of `directory` was trained at (tokenizer.json), None if unrecorded."""
    return read_spec(directory).get("image_size")


def load_tokenizer(directory: str) -> VQModel:
    """The VQModel stored in `directory`, its params checked against the recorded sha256."""
    spec = read_spec(directory)
    arch = VQArchitecture.from_dict(spec["architecture"])
    params_path = os.path.join(directory, PARAMS_FILE)
    with open(params_path, "rb") as f:
        params_bytes = f.read()
    if hashlib.sha256(params_bytes).hexdigest() != spec["params_sha256"]:
        raise ValueError(f"{params_path}: sha256 does not match {SPEC_FILE}; the file is corrupt or was replaced")
    with np.load(io.BytesIO(params_bytes), allow_pickle=False) as archive:
        params = {name: archive[name] for name in archive.files}
    model = abstract_vq_model(arch)
    load_flat_params(model, params, params_path)
    return model


def tokenizer_hash(directory: str) -> str:
    """sha256 over the architecture and the parameters' hash: what token shards record as provenance."""
    spec = read_spec(directory)
    identity = json.dumps({"architecture": spec["architecture"], "params_sha256": spec["params_sha256"]},
                          sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()
