"""A LASADGen model between configs, disk and tokenizers: config.model -> ModelConfig, the fields that
decide whether a checkpoint fits, parameters saved and restored with Orbax, and a tokenizer checked
against the model's vocabulary. Shared by the trainer, sampling and evaluation."""

from __future__ import annotations

import dataclasses
import json
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

# Beside the Orbax files of every params directory: the ModelConfig that owns them (and, from
# convert_llamagen, where they came from), so that `sample --ckpt=DIR` needs no --config.
MODEL_FILE = "model.json"
PARAMS_FORMAT = "lasadgen_jax.params/1"
# The fields a --config must agree on with a params directory's model.json: the parameter shapes and
# what the parameters compute (dropouts, dtypes, remat and the kernel choice may differ).
BEHAVIOUR_FIELDS = CHECKPOINT_FIELDS + ("rope_layout", "use_rope", "decay_range", "norm_eps")


def _target(path) -> epath.Path:
    return epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(path))


def save_params(model: LASADGen, path, force: bool = False, record: dict | None = None):
    """Writes the model's parameters as an Orbax checkpoint at `path` and its config as path/model.json
    (with `record`'s keys added): a new directory, or with `force` a replaced one; a local path or a URI
    such as gs://... (every process calls this; process 0 writes model.json)."""
    target = _target(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, nnx.state(model, nnx.Param), force=force)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        content = {"format": PARAMS_FORMAT, "model": config_to_json(model.config), **(record or {})}
        (target / MODEL_FILE).write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")


def config_to_json(model_config: ModelConfig) -> dict:
    """Every ModelConfig field, JSON-able (tuples as lists)."""
    return {name: _jsonable(value) for name, value in dataclasses.asdict(model_config).items()}


def params_directory(ckpt: str) -> str:
    """The params directory `ckpt` names: itself, or a trainer workdir's params_ema."""
    target = _target(ckpt)
    if not target.is_dir():
        raise ValueError(f"--ckpt {ckpt} is not a directory (a params directory or a trainer workdir)")
    if not (target / MODEL_FILE).exists() and (target / "params_ema").is_dir():
        return str(target / "params_ema")
    return str(target)


def read_model_config(params_dir: str) -> ModelConfig | None:
    """The ModelConfig recorded in params_dir/model.json; None for a directory without one."""
    path = _target(params_dir) / MODEL_FILE
    if not path.exists():
        return None
    fields = json.loads(path.read_text()).get("model")
    if not isinstance(fields, dict):
        raise ValueError(f"{path} has no 'model' object")
    unknown = set(fields) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown model fields {sorted(unknown)}")
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def config_differences(recorded: ModelConfig, configured: ModelConfig) -> list[str]:
    """'field: recorded X, config Y' for every BEHAVIOUR_FIELDS field where the two differ."""
    return [f"{name}: checkpoint {getattr(recorded, name)!r}, config {getattr(configured, name)!r}"
            for name in BEHAVIOUR_FIELDS if getattr(recorded, name) != getattr(configured, name)]


def check_config_matches(params_dir: str, model_config: ModelConfig) -> None:
    """Refuses a --config whose model differs from the one recorded beside the params (if recorded)."""
    recorded = read_model_config(params_dir)
    differences = [] if recorded is None else config_differences(recorded, model_config)
    if differences:
        raise ValueError(f"checkpoint {params_dir} does not fit this model config ({MODEL_FILE} differs): "
                         + "; ".join(differences) + " (leave out --config to use the checkpoint's own)")


def _param_name(path) -> str:
    """'blocks/0/ffn/w1/kernel' of a tree path (nnx's trailing 'value' left out)."""
    parts = [str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path]
    return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def _shape_differences(abstract, params_dir: str, limit: int = 5) -> str:
    """The first `limit` parameters whose stored shape differs from the model's (or that are missing)."""
    try:
        metadata = ocp.StandardCheckpointer().metadata(params_dir)
        stored = getattr(metadata, "item_metadata", metadata)
        stored_shapes = {_param_name(path): tuple(leaf.shape)
                         for path, leaf in jax.tree_util.tree_leaves_with_path(stored) if hasattr(leaf, "shape")}
    except Exception:  # noqa: BLE001 -- the summary is a courtesy; the refusal stands without it
        return ""
    wanted = {_param_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    lines = [f"{name}: checkpoint {stored_shapes.get(name, 'missing')}, model {shape}"
             for name, shape in wanted.items() if stored_shapes.get(name) != shape]
    lines += [f"{name}: only in the checkpoint" for name in stored_shapes if name not in wanted]
    more = f" (+{len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def load_params(model: LASADGen, path: str) -> LASADGen:
    """Restores parameters written by save_params into `model`; a model.json of another model, or
    parameters of other shapes, are refused naming the differences."""
    path = str(_target(path))
    if not os.path.isdir(path) and "://" not in path:
        raise ValueError(f"--ckpt {path} is not a checkpoint directory")
    check_config_matches(path, model.config)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(model, nnx.Param))
    try:
        restored = ocp.StandardCheckpointer().restore(path, abstract)
    except ValueError:
        summary = _shape_differences(abstract, path) or "the parameter tree differs"
        raise ValueError(f"checkpoint {path} does not fit this model config: {summary}") from None
    nnx.update(model, restored)
    return model


def resolve_model(ckpt: str, config) -> tuple[str, ModelConfig]:
    """(params directory, ModelConfig) of --ckpt (a params directory or a trainer workdir) and the
    optional --config: the config's model when given (checked against model.json), else the recorded one."""
    params_dir = params_directory(ckpt)
    if config is not None:
        model_config = model_config_from(config)
        check_config_matches(params_dir, model_config)
        return params_dir, model_config
    recorded = read_model_config(params_dir)
    if recorded is None:
        raise ValueError(f"--ckpt {params_dir} has no {MODEL_FILE} (written beside parameters since this version); "
                         f"pass --config=... for its model")
    return params_dir, recorded


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer_for(tokenizer_dir: str, model_config: ModelConfig, source: str) -> VQModel:
    """The tokenizer of `tokenizer_dir`, refused unless its codebook is the model's vocabulary.
    source: how the caller names the directory in errors (a flag or config key)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.arch.codebook_size != model_config.vocab_size:
        raise ValueError(f"{source} {tokenizer_dir} has a codebook of {tokenizer.arch.codebook_size}, the model's "
                         f"vocab_size is {model_config.vocab_size} (config.model.vocab_size)")
    return tokenizer
