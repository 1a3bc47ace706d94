"""Convert LlamaGen's class-conditional GPT checkpoints (c2i_B_256.pt ... c2i_3B_384.pt) into parameters
of the softmax LASADGen (attention=softmax, rope_layout=llamagen).

    python -m lasadgen_jax.convert_llamagen --src c2i_L_256.pt --dst params/llamagen_L_256 [--size L]
        [--image_size 256] [--key auto]

The checkpoint is loaded with `torch.load(..., weights_only=True)` (tensors and plain containers,
never code); its state_dict sits under "model" (the DDP releases) or at the top level (the FSDP
releases, XXL and 3B); `--key` names another key. Every LlamaGen tensor is mapped or refused by
name: the names and shapes of the state_dict must be exactly those of a LlamaGen c2i GPT of the
inferred size (the optional `freqs_cis` buffer must equal the 2D RoPE table of the grid).

The size comes from the shapes (depth from the layers, dim from the embeddings; the head count,
which no shape shows, from LlamaGen's size table); `--size` is checked against them. The grid
comes from `--image_size` / 16 or else from the file name (`_256`, `_384`) or `freqs_cis`.

Layout differences, and how each is made the same function:
- the fused `attention.wqkv` [3 dim, dim] is split into q, k, v; PyTorch's [out, in] matrices are
  transposed to Flax's [in, out] kernels;
- LlamaGen's RoPE pairs interleaved features (2i, 2i+1), ours pairs (i, i + head_dim/2) with the
  same frequencies (row frequencies on the first half of the pairs, column on the second): the q
  and k output features of each head are permuted (exact, q.k is unchanged);
- which cell rotates a query, and the zeroed class-token queries and keys, cannot be permuted
  away: the model's `rope_layout="llamagen"` option (models/rope.py) does what LlamaGen does;
- the class table has num_classes + 1 rows, the last the null class, in both; RMSNorm eps 1e-5,
  SwiGLU w1/w2/w3 and the class token in front are the same.

DST is a new directory (an existing one is refused, nothing is overwritten): the Orbax parameters
that `model_io.load_params` reads (`--ckpt=DST`), with `model.json` (model_io.MODEL_FILE): the model
config (so `sample --ckpt=DST` needs no --config), the source file's sha256 and the matching `--config` flags.
torch is the optional extra `torch`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil

import numpy as np
from flax import nnx

from lasadgen_jax.model_io import MODEL_FILE, config_to_json, save_params
from lasadgen_jax.models.lasadgen import SIZES, LASADGen, ModelConfig
from lasadgen_jax.tokenizer.checkpoint import load_flat_params
from lasadgen_jax.torch_checkpoint import float32_arrays, is_tensor, load_checkpoint

RECORD_FILE = MODEL_FILE
RECORD_KIND = "lasadgen_jax.convert_llamagen"
DOWNSAMPLE = 16            # VQ-16: 256 px -> 16x16 tokens, 384 px -> 24x24
ROPE_BASE = 10000.0        # LlamaGen's ModelArgs.rope_base, SoftmaxAttention's default
CLASS_TOKENS = 1           # LlamaGen's cls_token_num for c2i; LASADGen's num_prefix
CONFIG_FILES = {16: "configs/imagenet256.py", 24: "configs/imagenet384.py"}
LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


# ----------------------------------------------------------------------------- reading the checkpoint


def load_gpt_state_dict(path: str, key: str = "auto") -> tuple[dict[str, np.ndarray], str]:
    """(the state_dict of a LlamaGen GPT checkpoint as float32 numpy arrays, the key it was under; '' = top level).

    key "auto": under "model" if present, else the top level when it holds only tensors (FSDP releases).
    """
    checkpoint = load_checkpoint(path)
    if key == "auto":
        all_tensors = all(is_tensor(value) for value in checkpoint.values())
        key = "model" if isinstance(checkpoint.get("model"), dict) else "" if all_tensors else None
        if key is None:
            raise ValueError(f"--src {path!r} has no state_dict under 'model' and its top level is not one "
                             f"(keys {sorted(checkpoint)[:8]}); pass --key")
    elif key not in checkpoint or not isinstance(checkpoint[key], dict):
        raise ValueError(f"--src {path!r} has no state_dict under --key {key!r}; it holds {sorted(checkpoint)[:8]}")
    state_dict = checkpoint[key] if key else checkpoint
    return float32_arrays(state_dict, path, "of the state_dict"), key


def _shape(state_dict: dict, name: str, ndim: int, source: str) -> tuple[int, ...]:
    if name not in state_dict:
        raise ValueError(f"{source}: no tensor {name!r}: not a LlamaGen c2i GPT checkpoint")
    shape = tuple(state_dict[name].shape)
    if len(shape) != ndim:
        raise ValueError(f"{source}: {name} has shape {shape}, expected {ndim} dims")
    return shape


def infer_model_config(state_dict: dict, grid: tuple[int, int], size: str | None = None,
                       num_heads: int | None = None, source: str = "state_dict") -> ModelConfig:
    """The softmax LASADGen config of a LlamaGen state_dict, from its shapes (and `size` or `num_heads`
    for the head count). Every disagreement (with --size, with LlamaGen's sizes) is named."""
    vocab_size, dim = _shape(state_dict, "tok_embeddings.weight", 2, source)
    class_rows, class_dim = _shape(state_dict, "cls_embedding.embedding_table.weight", 2, source)
    if class_dim != dim:
        raise ValueError(f"{source}: cls_embedding.embedding_table.weight is {class_dim} wide, tok_embeddings {dim}")
    if class_rows < 2:
        raise ValueError(f"{source}: cls_embedding.embedding_table.weight has {class_rows} rows; a c2i GPT trained "
                         f"for guidance has num_classes + 1 (the last the null class)")
    layers = {int(match.group(1)) for match in map(LAYER_KEY.fullmatch, state_dict) if match}
    depth = len(layers)
    if not depth or layers != set(range(depth)):
        raise ValueError(f"{source}: transformer layers {sorted(layers)[:8]} are not layers.0 .. layers.N-1")
    hidden = _shape(state_dict, "layers.0.feed_forward.w1.weight", 2, source)[0]
    config = ModelConfig(vocab_size=vocab_size, num_classes=class_rows - 1, grid=grid, dim=dim, depth=depth,
                         num_heads=head_count(depth, dim, size, num_heads, source), attention="softmax",
                         num_prefix=CLASS_TOKENS, rope_layout="llamagen")
    if config.ffn_hidden != hidden:
        raise ValueError(f"{source}: layers.0.feed_forward.w1.weight has {hidden} hidden features; LlamaGen's rule "
                         f"(2/3 of 4 dim, a multiple of 256) gives {config.ffn_hidden} for dim {dim}")
    return config


def head_count(depth: int, dim: int, size: str | None, num_heads: int | None, source: str) -> int:
    """The head count, which no shape shows: LlamaGen's for the size whose (depth, dim) the shapes have
    (`size`, if given, must be that one), else `num_heads`."""
    matching = [name for name, (d, _, m) in SIZES.items() if (d, m) == (depth, dim)]
    if size is not None:
        if size not in SIZES:
            raise ValueError(f"--size must be one of {tuple(SIZES)}, got {size!r}")
        if size not in matching:
            raise ValueError(f"{source}: --size {size} is depth {SIZES[size][0]}, dim {SIZES[size][2]}; the "
                             f"checkpoint has depth {depth}, dim {dim}" +
                             (f" (LlamaGen-{matching[0]})" if matching else ""))
    size = size or (matching[0] if matching else None)
    if size is None:
        if num_heads is None:
            raise ValueError(f"{source}: depth {depth}, dim {dim} is none of LlamaGen's sizes "
                             f"{ {name: (d, m) for name, (d, _, m) in SIZES.items()} }; pass num_heads")
        return num_heads
    if num_heads is not None and num_heads != SIZES[size][1]:
        raise ValueError(f"--num_heads {num_heads} disagrees with LlamaGen-{size}'s {SIZES[size][1]} heads")
    return SIZES[size][1]


def grid_from(image_size: int | None, src: str, state_dict: dict) -> tuple[int, int]:
    """The token grid: image_size / 16, else a `_256` / `_384` in the file name, else `freqs_cis`'s length."""
    if image_size is None:
        found = re.findall(r"_(\d{3,4})(?=[_.])", os.path.basename(src))
        if found:
            image_size = int(found[-1])
        elif "freqs_cis" in state_dict:
            side = round((state_dict["freqs_cis"].shape[0] - CLASS_TOKENS) ** 0.5)
            return side, side
        else:
            raise ValueError(f"--src {src!r}: the image size is not in the file name (c2i_L_256.pt); pass --image_size")
    if image_size < DOWNSAMPLE or image_size % DOWNSAMPLE:
        raise ValueError(f"--image_size {image_size} is not a positive multiple of {DOWNSAMPLE} (VQ-16)")
    return image_size // DOWNSAMPLE, image_size // DOWNSAMPLE


# ----------------------------------------------------------------------------- mapping the tensors


def llamagen_rope_table(side: int, head_dim: int, class_tokens: int = CLASS_TOKENS) -> np.ndarray:
    """LlamaGen's 2D RoPE cos/sin table [class_tokens + side^2, head_dim/2, 2]: for the pairs of the
    first half the row angle, for the second half the column angle; the class tokens' rows are 0."""
    quarter = head_dim // 4
    inv_freq = 1.0 / ROPE_BASE ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.divmod(np.arange(side * side), side)
    angles = np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=-1)
    table = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return np.concatenate([np.zeros((class_tokens, 2 * quarter, 2)), table]).astype(np.float32)


def split_half_order(num_heads: int, head_dim: int) -> np.ndarray:
    """Output-feature order taking LlamaGen's interleaved RoPE pairs (2i, 2i+1) to split halves (i, i + head_dim/2)."""
    within = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return (np.arange(num_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a LlamaGen c2i GPT state_dict with its shape."""
    dim, hidden = config.dim, config.ffn_hidden
    layer = {"attention.wqkv.weight": (3 * dim, dim), "attention.wo.weight": (dim, dim),
             "feed_forward.w1.weight": (hidden, dim), "feed_forward.w2.weight": (dim, hidden),
             "feed_forward.w3.weight": (hidden, dim), "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}
    shapes = {"tok_embeddings.weight": (config.vocab_size, dim),
              "cls_embedding.embedding_table.weight": (config.num_classes + 1, dim),
              "norm.weight": (dim,), "output.weight": (config.vocab_size, dim)}
    shapes.update({f"layers.{i}.{name}": shape for i in range(config.depth) for name, shape in layer.items()})
    return shapes


def check_state_dict(state_dict: dict, config: ModelConfig, source: str) -> None:
    """Refuses, by name, a missing, unknown or misshapen tensor, and a freqs_cis unlike the grid's RoPE table."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    unknown = sorted(set(state_dict) - set(expected) - {"freqs_cis"})
    wrong = [f"{name} {tuple(state_dict[name].shape)} (expected {shape})" for name, shape in expected.items()
             if name in state_dict and tuple(state_dict[name].shape) != shape]
    if missing or unknown or wrong:
        raise ValueError(f"{source}: not a LlamaGen c2i GPT of depth {config.depth}, dim {config.dim}, vocab "
                         f"{config.vocab_size}, {config.num_classes} classes: missing {missing[:8]}, unknown "
                         f"{unknown[:8]}, wrong shapes {wrong[:8]}")
    if "freqs_cis" in state_dict:
        table = llamagen_rope_table(config.grid[0], config.dim // config.num_heads)
        held = state_dict["freqs_cis"]
        if config.grid[0] != config.grid[1] or held.shape != table.shape or not np.allclose(held, table, atol=1e-5):
            raise ValueError(f"{source}: freqs_cis {held.shape} is not LlamaGen's 2D RoPE table of a "
                             f"{config.grid[0]}x{config.grid[1]} grid {table.shape} (wrong --image_size?)")


def convert_state_dict(state_dict: dict[str, np.ndarray], config: ModelConfig,
                       source: str = "state_dict") -> dict[str, np.ndarray]:
    """{LASADGen parameter name: float32 array} from a LlamaGen state_dict (names and shapes checked first)."""
    check_state_dict(state_dict, config, source)
    rope_order = split_half_order(config.num_heads, config.dim // config.num_heads)
    kernel = lambda name: np.ascontiguousarray(state_dict[name].T)  # PyTorch [out, in] -> Flax [in, out]
    params = {
        "class_embedder/embedding/embedding": state_dict["cls_embedding.embedding_table.weight"],
        "token_embedding/embedding": state_dict["tok_embeddings.weight"],
        "norm/scale": state_dict["norm.weight"],
        "head/kernel": kernel("output.weight"),
    }
    for i in range(config.depth):
        ours, theirs = f"blocks/{i}", f"layers.{i}"
        q, k, v = np.split(state_dict[f"{theirs}.attention.wqkv.weight"], 3)
        params.update({
            f"{ours}/attention/q_proj/kernel": np.ascontiguousarray(q[rope_order].T),
            f"{ours}/attention/k_proj/kernel": np.ascontiguousarray(k[rope_order].T),
            f"{ours}/attention/v_proj/kernel": np.ascontiguousarray(v.T),
            f"{ours}/attention/out_proj/kernel": kernel(f"{theirs}.attention.wo.weight"),
            f"{ours}/attention_norm/scale": state_dict[f"{theirs}.attention_norm.weight"],
            f"{ours}/ffn_norm/scale": state_dict[f"{theirs}.ffn_norm.weight"],
            **{f"{ours}/ffn/{w}/kernel": kernel(f"{theirs}.feed_forward.{w}.weight") for w in ("w1", "w2", "w3")},
        })
    return params


def model_with_params(config: ModelConfig, params: dict[str, np.ndarray], source: str) -> LASADGen:
    """A LASADGen of `config` holding `params` (built abstract first: no random initialisation)."""
    model = nnx.eval_shape(lambda: LASADGen(config, rngs=nnx.Rngs(0)))
    load_flat_params(model, params, source)
    return model


# ----------------------------------------------------------------------------- writing


def sampling_flags(config: ModelConfig) -> str:
    """The --config flags with which `sample` and `evaluate` build this model."""
    size = next((name for name, shape in SIZES.items() if shape == (config.depth, config.num_heads, config.dim)), None)
    config_file = CONFIG_FILES.get(config.grid[0]) if config.grid[0] == config.grid[1] else None
    if size is None or config_file is None or (config.vocab_size, config.num_classes) != (16384, 1000):
        return ""  # not an ImageNet config of this project: the record's model fields say what to build
    return f"--config={config_file}:size={size},attention=softmax --config.model.rope_layout=llamagen"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_params_directory(model: LASADGen, record: dict, dst: str) -> None:
    """The Orbax parameters (model_io.save_params) and the record, staged beside `dst` and renamed into place."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst):
        raise ValueError(f"--dst {dst} exists; nothing was overwritten (choose a new directory)")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    staging = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.partial-{os.getpid()}")
    try:
        save_params(model, staging, record={key: value for key, value in record.items() if key != "model"})
        if os.path.lexists(dst):
            raise ValueError(f"--dst {dst} appeared while converting; nothing was overwritten")
        os.rename(staging, dst)
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging)


def convert_checkpoint(src: str, dst: str, size: str | None = None, image_size: int | None = None,
                       num_heads: int | None = None, key: str = "auto") -> dict:
    """Converts the LlamaGen GPT checkpoint `src` into the new params directory `dst`; returns the record."""
    if os.path.lexists(dst):
        raise ValueError(f"--dst {os.path.abspath(dst)} exists; nothing was overwritten (choose a new directory)")
    state_dict, found_key = load_gpt_state_dict(src, key)
    config = infer_model_config(state_dict, grid_from(image_size, src, state_dict), size, num_heads, source=src)
    model = model_with_params(config, convert_state_dict(state_dict, config, source=src), source=src)
    del state_dict
    record = {
        "kind": RECORD_KIND,
        "model": config_to_json(config),
        "config_flags": sampling_flags(config),
        "source": {"file": os.path.basename(src), "sha256": file_sha256(src), "key": found_key},
    }
    write_params_directory(model, record, dst)
    return record


# ----------------------------------------------------------------------------- command line


def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    record = convert_checkpoint(FLAGS.src, FLAGS.dst, FLAGS.size, FLAGS.image_size, FLAGS.num_heads, FLAGS.key)
    model = record["model"]
    print(f"wrote {FLAGS.dst}: LlamaGen GPT depth {model['depth']}, dim {model['dim']}, {model['num_heads']} heads, "
          f"grid {model['grid'][0]}x{model['grid'][1]} as softmax LASADGen (rope_layout=llamagen)"
          + f"; sample with python -m lasadgen_jax.sample --ckpt={FLAGS.dst} --tokenizer=TOKENIZER_DIR")


def define_flags():
    from absl import flags

    flags.DEFINE_string("src", None, "LlamaGen GPT checkpoint, e.g. c2i_L_256.pt.")
    flags.DEFINE_string("dst", None, "Params directory to create (must not exist).")
    flags.DEFINE_enum("size", None, list(SIZES), "LlamaGen size; checked against the shapes (default: inferred).")
    flags.DEFINE_integer("image_size", None, "Image size in pixels (grid = image_size / 16); default: from the "
                         "file name (_256, _384).")
    flags.DEFINE_integer("num_heads", None, "Head count, for a GPT that is none of LlamaGen's sizes.")
    flags.DEFINE_string("key", "auto", "Key of the state_dict in the checkpoint ('auto': 'model', else the top level).")
    flags.mark_flags_as_required(["src", "dst"])


if __name__ == "__main__":
    from lasadgen_jax import cli

    define_flags()
    cli.run(main)
