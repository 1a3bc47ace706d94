"""A LASADGen model between configs, disk and tokenizers: config.model -> ModelConfig, the fields that
decide whether a checkpoint fits, parameters saved and restored with Orbax, and a tokenizer checked
against the model's vocabulary. Shared by the trainer, sampling and evaluation."""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig
from lasadgen_jax.tokenizer import VQModel, load_tokenizer

# The ModelConfig fields that decide the parameters (and so whether a checkpoint belongs to a model).
CHECKPOINT_FIELDS = ("vocab_size", "num_classes", "grid", "dim", "depth", "num_heads", "attention", "num_prefix",
                     "ffn_multiple_of")


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of config.model (lists become tuples); an unknown field is an error."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
    unknown = set(fields) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"config.model has unknown fields {sorted(unknown)}")
    return ModelConfig(**fields)


def model_identity(model_config: ModelConfig) -> dict:
    """The CHECKPOINT_FIELDS of a model config, JSON-able (tuples as lists)."""
    return {field: _jsonable(getattr(model_config, field)) for field in CHECKPOINT_FIELDS}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------- params on disk


def save_params(model: LASADGen, path, force: bool = False):
    """Writes the model's parameters as an Orbax checkpoint at `path`: a new directory, or with
    `force` a replaced one; a local path or a URI such as gs://... (every process calls this)."""
    target = epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(path))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, nnx.state(model, nnx.Param), force=force)
    checkpointer.wait_until_finished()


def load_params(model: LASADGen, path: str) -> LASADGen:
    """Restores parameters written by save_params into `model` (shapes must match its config)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"--ckpt {path} is not a checkpoint directory")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(model, nnx.Param))
    try:
        restored = ocp.StandardCheckpointer().restore(path, abstract)
    except ValueError as error:
        raise ValueError(f"checkpoint {path} does not fit this model config: {error}") from None
    nnx.update(model, restored)
    return model


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer_for(tokenizer_dir: str, model_config: ModelConfig, source: str) -> VQModel:
    """The tokenizer of `tokenizer_dir`, refused unless its codebook is the model's vocabulary.
    source: how the caller names the directory in errors (a flag or config key)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.arch.codebook_size != model_config.vocab_size:
        raise ValueError(f"{source} {tokenizer_dir} has a codebook of {tokenizer.arch.codebook_size}, the model's "
                         f"vocab_size is {model_config.vocab_size} (config.model.vocab_size)")
    return tokenizer
