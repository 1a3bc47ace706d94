"""Convert LlamaGen's PyTorch VQ checkpoint (e.g. vq_ds16_c2i.pt) into a tokenizer directory.

    python -m lasadgen_jax.tokenizer.convert --src=vq_ds16_c2i.pt --dst=tokenizers/vq16 [--arch=vq16] [--key=model]

The checkpoint is a dict holding a state_dict under `--key` ("model" in the public release). It is
loaded with `torch.load(..., weights_only=True)`: tensors and plain containers only, never code.
Every parameter of the Flax tree must be found, with the right shape, and every tensor of the
state_dict must be used (except LlamaGen's `quantize.codebook_used` usage counter): a checkpoint of
another architecture is refused by name, not half-loaded. torch is the optional extra `torch`.
"""

from __future__ import annotations

import json

import numpy as np

from lasadgen_jax.tokenizer import architecture as architectures
from lasadgen_jax.tokenizer.checkpoint import load_flat_params, param_shapes, save_tokenizer
from lasadgen_jax.tokenizer.model import VQModel, abstract_vq_model
from lasadgen_jax.torch_checkpoint import float32_arrays, load_checkpoint

# Buffers in LlamaGen's state_dict that are bookkeeping, not parameters.
IGNORED_TORCH_KEYS = frozenset({"quantize.codebook_used"})


def torch_key(flax_name: str) -> str:
    """The LlamaGen state_dict key of a Flax parameter name ('encoder/conv_in/kernel' -> 'encoder.conv_in.weight')."""
    parts = flax_name.split("/")
    if parts == ["quantize", "embedding"]:
        return "quantize.embedding.weight"
    leaf_names = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    if parts[-1] not in leaf_names:
        raise ValueError(f"no PyTorch name for Flax parameter {flax_name!r}")
    return ".".join(parts[:-1] + [leaf_names[parts[-1]]])


def to_flax_layout(flax_name: str, tensor: np.ndarray) -> np.ndarray:
    """PyTorch conv kernels are [out, in, kh, kw]; Flax wants [kh, kw, in, out]."""
    if flax_name.endswith("/kernel"):
        if tensor.ndim != 4:
            raise ValueError(f"conv weight for {flax_name} has {tensor.ndim} dims, expected 4 ([out, in, kh, kw])")
        return np.transpose(tensor, (2, 3, 1, 0))
    return tensor


def convert_state_dict(state_dict: dict[str, np.ndarray], arch: architectures.VQArchitecture,
                       source: str = "state_dict") -> VQModel:
    """A VQModel of `arch` holding the state_dict's weights (numpy arrays keyed by LlamaGen names)."""
    model = abstract_vq_model(arch)
    names = list(param_shapes(model))
    wanted = {torch_key(name): name for name in names}
    available = set(state_dict) - IGNORED_TORCH_KEYS
    missing, unexpected = sorted(set(wanted) - available), sorted(available - set(wanted))
    if missing or unexpected:
        raise ValueError(f"{source}: not a checkpoint of this architecture ({arch}); missing keys "
                         f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected keys "
                         f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    params = {flax_name: to_flax_layout(flax_name, np.asarray(state_dict[key], np.float32))
              for key, flax_name in wanted.items()}
    load_flat_params(model, params, source)
    return model


def load_torch_state_dict(path: str, key: str) -> dict[str, np.ndarray]:
    """The state_dict under `key` of a PyTorch checkpoint file, as float32 numpy arrays."""
    checkpoint = load_checkpoint(path)
    if key not in checkpoint:
        raise ValueError(f"--src {path!r} has no state_dict under --key {key!r}; it holds {sorted(checkpoint)}")
    return float32_arrays(checkpoint[key], path, f"under {key!r}")


def resolve_architecture(value: str) -> architectures.VQArchitecture:
    """A preset name (vq16, vq_small) or the path of a JSON file of VQArchitecture fields."""
    if value.endswith(".json"):
        with open(value) as f:
            return architectures.VQArchitecture.from_dict(json.load(f))
    return architectures.preset(value)


def convert_tokenizer(src: str, dst: str, arch: str = "vq16", key: str = "model", image_size: int = 256) -> str:
    """Converts the checkpoint `src` into the tokenizer directory `dst`; returns its hash."""
    model = convert_state_dict(load_torch_state_dict(src, key), resolve_architecture(arch), source=src)
    digest = save_tokenizer(model, dst, image_size=image_size)
    print(f"wrote {dst} (tokenizer hash {digest[:16]}, trained at {image_size} px)")
    return digest


def main(argv):
    from absl import flags

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    convert_tokenizer(FLAGS.src, FLAGS.dst, FLAGS.arch, FLAGS.key, FLAGS.image_size)


def define_flags():
    from absl import flags

    flags.DEFINE_string("src", None, "PyTorch checkpoint (.pt).")
    flags.DEFINE_string("dst", None, "Tokenizer directory to write.")
    flags.DEFINE_string("arch", "vq16", "Preset name or a .json file of VQArchitecture fields.")
    flags.DEFINE_string("key", "model", "Key of the state_dict inside the checkpoint dict.")
    flags.DEFINE_integer("image_size", 256, "Image side the tokenizer was trained at (LlamaGen's VQ: 256), "
                         "recorded in tokenizer.json as token extraction's default.")
    flags.mark_flags_as_required(["src", "dst"])


if __name__ == "__main__":
    from lasadgen_jax import cli

    define_flags()
    cli.run(main)
