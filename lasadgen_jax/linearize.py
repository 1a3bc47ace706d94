"""Start a model from another model's parameters: a LASAD model (any variant) from a softmax checkpoint
("linearization"), or any model from one of the same architecture. The trainer's `config.init_from`.

    python -m lasadgen_jax.train --config=configs/linearize.py --config.init_from=SOFTMAX_PARAMS ...

Every parameter whose name and shape match is copied: embeddings, the q/k/v/out projections, the
SwiGLU MLPs, the norms, the head and the class embeddings. The parameters a LASAD block has and a
softmax block lacks (LASAD_ONLY) keep their fresh initialisation:

- `gate_proj` (LeCun normal, variance 1/dim): the block's input is RMS-normalised (attention_norm,
  copied), so each gate entry starts as about N(0, g^2) with g that norm's scale, and SiLU(gate) has
  an RMS of about 0.6 g (0.597 for g = 1): a random, order-one mix per channel, not a learned one;
- `out_norm_scale` (ones): the per-head RMSNorm of the linear-attention read-out fixes each head's
  output to RMS 1 whatever the number of keys summed and however q.k is scaled (unnormalised linear
  attention grows with the keys it sums, where softmax averages values of RMS about g). So the
  vector the copied `out_proj` sees starts at RMS ~0.6 g, the order of a softmax read-out, not at
  a scale that grows with the sequence: the residual stream is not swamped and the copied MLPs and
  head keep receiving inputs of their trained scale. The attention's content is new (linear, not
  softmax, mixing), which the fine-tuning must learn; benchmarks/linearize.py records the test NLL
  right after the copy, before any fine-tuning;
- the decays `decay_row_theta` / `decay_col_theta` (per head, spread over config.model.decay_range).

Nothing else may differ: a source parameter with another shape or a name the target lacks, or a target
parameter (other than LASAD_ONLY) that the source lacks, is a ValueError naming them. Where the source
directory has a model.json (model_io.save_params, convert_llamagen), its shape-deciding fields other
than `attention` must equal the target's. The source's RoPE layout is not a parameter: a LlamaGen
conversion (rope_layout 'llamagen') rotates queries by their own cell, LASAD by the cell they predict,
which the fine-tuning absorbs.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from lasadgen_jax.model_io import CHECKPOINT_FIELDS, MODEL_FILE, read_model_config
from lasadgen_jax.models.lasadgen import ModelConfig

# Parameters of a LASAD attention block that softmax attention has no counterpart for (last name parts).
LASAD_ONLY = ("attention/gate_proj/kernel", "attention/out_norm_scale", "attention/decay_row_theta",
              "attention/decay_col_theta")
# Where a trainer workdir keeps exported parameters, in the order looked for.
WORKDIR_PARAMS = ("params_ema", "params")


def param_name(path) -> str:
    """'blocks/0/ffn/w1/kernel' of a tree path (an Orbax tree's trailing 'value' left out)."""
    parts = [str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path]
    return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def named_leaves(tree) -> dict:
    return {param_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def is_lasad_only(name: str) -> bool:
    return any(name.endswith("/" + suffix) for suffix in LASAD_ONLY)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """What init_from did: the source, the copied and the freshly initialised parameter names."""

    source: str
    copied: tuple[str, ...]
    fresh: tuple[str, ...]

    def summary(self) -> str:
        kinds = sorted({name.split("/attention/")[-1] for name in self.fresh})
        return (f"init_from {self.source}: {len(self.copied)} parameters copied, {len(self.fresh)} fresh"
                + (f" ({', '.join(kinds)} in every block)" if kinds else ""))


def check_transfer(source_shapes: dict, fresh_shapes: dict, source_name: str) -> None:
    """Refuse (one ValueError naming them) source parameters of another shape or of a name the model
    lacks, and model parameters other than LASAD_ONLY that the source lacks. Arguments: {name: shape}."""
    mismatched = [f"{name} {source_shapes[name]} vs {shape}" for name, shape in fresh_shapes.items()
                  if name in source_shapes and source_shapes[name] != shape]
    unknown = sorted(set(source_shapes) - set(fresh_shapes))
    missing = sorted(name for name in set(fresh_shapes) - set(source_shapes) if not is_lasad_only(name))
    problems = ([f"shapes differ (source vs model): {', '.join(mismatched)}"] if mismatched else []) + \
               ([f"only in the source: {', '.join(unknown)}"] if unknown else []) + \
               ([f"missing from the source: {', '.join(missing)}"] if missing else [])
    if problems:
        raise ValueError(f"init_from {source_name} does not fit this model: " + "; ".join(problems))


def leaf_shapes(tree) -> dict:
    return {name: tuple(leaf.shape) for name, leaf in named_leaves(tree).items() if hasattr(leaf, "shape")}


def transfer_params(source: dict, fresh: dict, source_name: str = "source") -> tuple[dict, Transfer]:
    """`fresh` (a pure dict of parameters) with every tensor that `source` has under the same name and
    shape copied in (cast to the fresh tensor's dtype); LASAD_ONLY parameters missing from the source
    keep their fresh values. Anything else that differs is a ValueError (check_transfer)."""
    source_leaves, fresh_leaves = named_leaves(source), named_leaves(fresh)
    check_transfer(leaf_shapes(source), leaf_shapes(fresh), source_name)

    def pick(path, leaf):
        name = param_name(path)
        if name not in source_leaves:
            return leaf
        return jnp.asarray(source_leaves[name], dtype=leaf.dtype)

    params = jax.tree_util.tree_map_with_path(pick, fresh)
    copied = tuple(sorted(name for name in fresh_leaves if name in source_leaves))
    fresh_names = tuple(sorted(name for name in fresh_leaves if name not in source_leaves))
    return params, Transfer(source_name, copied, fresh_names)


# ----------------------------------------------------------------------------- the source on disk


def source_params_dir(init_from: str) -> str:
    """The params directory `init_from` names: itself (Orbax parameters, model.json beside them where
    written by this package), or a trainer workdir's params_ema/ (else params/)."""
    target = epath.Path(init_from) if "://" in init_from else epath.Path(os.path.abspath(init_from))
    if not target.is_dir():
        raise ValueError(f"config.init_from {init_from} is not a directory (a params directory, e.g. from "
                         f"lasadgen_jax.convert_llamagen, or a trainer workdir with params_ema/)")
    if not (target / MODEL_FILE).exists():
        for name in WORKDIR_PARAMS:
            if (target / name).is_dir():
                return str(target / name)
    return str(target)


def check_source_identity(params_dir: str, model_config: ModelConfig) -> None:
    """Refuse a source whose model.json records other shape-deciding fields than the model's
    (attention aside: that is what linearization changes). A source without model.json is checked
    by its parameter shapes alone."""
    recorded = read_model_config(params_dir)
    if recorded is None:
        return
    differences = [f"{name}: source {getattr(recorded, name)!r}, model {getattr(model_config, name)!r}"
                   for name in CHECKPOINT_FIELDS if name != "attention"
                   and getattr(recorded, name) != getattr(model_config, name)]
    if differences:
        raise ValueError(f"config.init_from {params_dir} holds another model ({MODEL_FILE}): "
                         + "; ".join(differences))


def check_source(init_from: str, model_config: ModelConfig, fresh_abstract: dict) -> None:
    """Every refusal of params_from, from model.json and the Orbax metadata alone (no tensor is read).
    fresh_abstract: the model's parameters (arrays or shape structs)."""
    params_dir = source_params_dir(init_from)
    check_source_identity(params_dir, model_config)
    metadata = ocp.StandardCheckpointer().metadata(params_dir)
    check_transfer(leaf_shapes(getattr(metadata, "item_metadata", metadata)), leaf_shapes(fresh_abstract), params_dir)


def params_from(init_from: str, fresh: dict, model_config: ModelConfig) -> tuple[dict, Transfer]:
    """`fresh` with the parameters of the directory `init_from` copied in (transfer_params), after the
    model.json check. Every process reads the whole source (as every process computes the whole fresh
    initialisation); the caller places the result."""
    params_dir = source_params_dir(init_from)
    check_source_identity(params_dir, model_config)
    source = jax.device_get(ocp.StandardCheckpointer().restore(params_dir))
    return transfer_params(source, fresh, params_dir)
