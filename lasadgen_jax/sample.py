"""Class-conditional sampling with classifier-free guidance; the token loop runs inside one jit.

    python -m lasadgen_jax.sample --config=configs/imagenet256.py:size=L,attention=2d \
        --ckpt=DIR/params --classes=207,360,387 --num=8 --cfg_scale=4 --out=DIR/samples

The decode state is the LASAD state of every block (fixed size; `2d` keeps w column states) or the
KV cache for `softmax`. With guidance the conditional and the null-class batches run stacked as one
batch of 2B (each label next to its null-class twin, so that a batch split over devices keeps both halves of a
row on one device) and `logits = u + s * (c - u)`. `generate_in_batches` splits a request into batches of at most
--batch_size, each split over the local devices (a 1-D 'data' mesh; params replicated); with several processes
(jax.distributed: --distributed, as the trainer's) the batches are dealt out to the hosts and gathered, and
process 0 writes the outputs. Writes the token grids
(tokens.npz) and a PNG of them, one row per class; with --tokenizer also the decoded images: images.npz (arr_0, uint8
[n, H, W, 3], the layout FID tools read) and samples.png.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lasadgen_jax.distributed import initialize_from_environment
from lasadgen_jax.model_io import load_params, load_tokenizer_for, model_config_from, resolve_model
from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig
from lasadgen_jax.tokenizer.evaluation import to_uint8

CFG_SCHEDULES = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """cfg_scale 1 = no guidance; temperature 0 = greedy; top_k 0 and top_p 1 = no filtering.

    cfg_schedule 'linear' raises the scale from 1 at the first cell to cfg_scale at the last.
    """

    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


# ----------------------------------------------------------------------------- logits -> tokens


def guided_logits(cond, uncond, scale):
    """Classifier-free guidance: u + s (c - u). Scale 1 gives the conditional logits."""
    return uncond + scale * (cond - uncond)


def cfg_scale_at(cell, num_tokens: int, config: SamplingConfig, scale=None):
    """The guidance scale at `cell` (`scale` overrides config.cfg_scale, e.g. with a traced value)."""
    scale = config.cfg_scale if scale is None else scale
    if config.cfg_schedule == "constant" or num_tokens == 1:
        return jnp.asarray(scale, jnp.float32)
    return 1.0 + (scale - 1.0) * cell / (num_tokens - 1)


def filter_logits(logits, top_k: int, top_p: float):
    """Keeps the top_k largest logits (0: all) and the smallest set whose probability reaches top_p."""
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # kept while the mass before it is < top_p
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def pick_tokens(key, logits, config: SamplingConfig):
    """[batch, vocab] float32 logits -> int32 [batch] tokens."""
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the token loop


def compiled_sampling_config(config: SamplingConfig) -> SamplingConfig:
    """The static part of `config` that _generate compiles for: the guidance scale is a traced argument
    (a CFG sweep compiles once), so only whether it guides stays; 0.0 stands for "some scale != 1"."""
    return dataclasses.replace(config, cfg_scale=0.0 if config.guided else 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _generate(graphdef, params, labels, key, cfg_scale, config: SamplingConfig):
    """`config` is compiled_sampling_config(...): its cfg_scale is not read, `cfg_scale` (traced) is."""
    model = nnx.merge(graphdef, params)
    num_tokens = model.config.num_tokens
    batch = labels.shape[0]
    if config.guided:  # rows (label, null class) interleaved: a batch-sharded row pair stays on one device
        labels = jnp.stack([labels, jnp.full_like(labels, model.class_embedder.null_class)], axis=1).reshape(-1)

    def choose(logits, cell, key):
        if config.guided:
            pairs = logits.reshape(batch, 2, -1)
            logits = guided_logits(pairs[:, 0], pairs[:, 1], cfg_scale_at(cell, num_tokens, config, cfg_scale))
        return pick_tokens(key, logits, config)

    keys = jax.random.split(key, num_tokens)
    state = model.init_decode_state(labels.shape[0])
    logits, state = model.prefill(labels, state)
    first = choose(logits, 0, keys[0])
    h, w = model.config.grid

    def step(carry, cell, row_start):
        state, previous = carry
        fed = jnp.repeat(previous, 2) if config.guided else previous
        logits, state = model.decode_step(fed, state, cell, row_start=row_start)
        token = choose(logits, cell, keys[cell])
        return (state, token), token

    # Rows outside, columns inside: whether a step starts a row is then static (no per-token cond).
    in_row = lambda carry, cell: step(carry, cell, row_start=False)

    def row(carry, row_index):
        start = row_index * w
        carry, first_of_row = step(carry, start, row_start=True)
        carry, rest_of_row = jax.lax.scan(in_row, carry, start + jnp.arange(1, w))
        return carry, jnp.concatenate([first_of_row[None], rest_of_row])

    carry, rest_of_row_0 = jax.lax.scan(in_row, (state, first), jnp.arange(1, w))
    _, later_rows = jax.lax.scan(row, carry, jnp.arange(1, h))  # [h-1, w, batch]
    tokens = jnp.concatenate([first[None], rest_of_row_0, later_rows.reshape(-1, batch)])
    return tokens.T


def sampling_mesh(devices=None) -> Mesh:
    """A 1-D mesh ('data') over `devices` (default: the local devices): each sampling batch is split over it."""
    return Mesh(np.asarray(jax.local_devices() if devices is None else devices), ("data",))


def _sample_batch(graphdef, params, labels, key, config: SamplingConfig, mesh: Mesh):
    """int32 tokens [n, h*w] for int32 labels [n], the batch split over `mesh` (params already replicated on it).

    n is padded (repeating the last label) to the next multiple of the device count only: a small request
    costs a small batch; the padded rows are dropped."""
    labels = np.asarray(labels, np.int32)
    rows = -(-len(labels) // mesh.size) * mesh.size
    padded = np.pad(labels, (0, rows - len(labels)), mode="edge")
    sharded = jax.device_put(padded, NamedSharding(mesh, PartitionSpec("data")))
    tokens = _generate(graphdef, params, sharded, key, jnp.float32(config.cfg_scale),
                       compiled_sampling_config(config))
    return tokens if rows == len(labels) else tokens[: len(labels)]


def _host_local(leaf):
    """A model state leaf as a value this process holds whole: the leaf itself when its devices are all local,
    else (a multi-host array, e.g. the trainer's parameters) its local replica, or its shards gathered from every
    process (a collective: every process maps the same leaves in the same order)."""
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
        return leaf
    if leaf.sharding.is_fully_replicated:
        return leaf.addressable_data(0)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(leaf, tiled=True)


def _replicated_split(model: LASADGen, mesh: Mesh):
    graphdef, params = nnx.split(model)
    return graphdef, jax.device_put(jax.tree.map(_host_local, params), NamedSharding(mesh, PartitionSpec()))


def generate(model: LASADGen, labels, key, config: SamplingConfig = SamplingConfig()):
    """Samples token grids for int labels [batch] as one batch, sharded as the params and labels are (the trainer's
    mesh); returns int32 [batch, h, w]. Requests of many images: generate_in_batches (all local devices)."""
    labels = jnp.asarray(labels)
    model.check_labels(labels, allow_null=True)
    graphdef, params = nnx.split(model)
    tokens = _generate(graphdef, params, labels.astype(jnp.int32), key, jnp.float32(config.cfg_scale),
                       compiled_sampling_config(config))
    return tokens.reshape(labels.shape[0], *model.config.grid)


def batch_keys(key, num_batches: int) -> list:
    """The key of each batch of generate_in_batches: batch i gets the i-th key split off `key` in turn."""
    keys = []
    for _ in range(num_batches):
        key, batch_key = jax.random.split(key)
        keys.append(batch_key)
    return keys


def host_batches(num_batches: int, process_index: int, process_count: int) -> range:
    """The batches one process samples when several share a request: every process_count-th, from its index."""
    return range(process_index, num_batches, process_count)


def gather_host_batches(local: list[np.ndarray], lengths: list[int], batch_size: int, num_tokens: int) -> list:
    """Every process's batches (host_batches) on every process, in request order: [length_i, num_tokens] each.

    Each process sends a fixed-shape block (its batches padded to batch_size rows, and to as many batches
    as the busiest process has), so that one process_allgather carries them all."""
    from jax.experimental import multihost_utils

    count = jax.process_count()
    slots = -(-len(lengths) // count)
    block = np.zeros((slots, batch_size, num_tokens), np.int32)
    for slot, tokens in enumerate(local):
        block[slot, : len(tokens)] = tokens
    every = np.asarray(multihost_utils.process_allgather(block))   # [count, slots, batch_size, num_tokens]
    return [every[index % count, index // count, :length] for index, length in enumerate(lengths)]


def generate_in_batches(model: LASADGen, labels, key, config: SamplingConfig, batch_size: int,
                        progress: bool = False, desc: str = "sampling", devices=None) -> np.ndarray:
    """Token grids int32 [n, h, w] for int labels [n], sampled in batches of at most `batch_size` (the last one
    only as large as what is left), each split over `devices` (default: the local devices); batch i uses the i-th
    split of `key` (batch_keys).

    With several processes (jax.distributed), each samples every process_count-th batch on its own devices
    and all of them return the whole request, the same tokens as one process sampling it alone."""
    from tqdm import tqdm

    labels = np.asarray(labels, np.int32)
    if labels.ndim != 1 or len(labels) == 0 or batch_size < 1:
        raise ValueError(f"labels must be a non-empty [n] array and batch_size >= 1, got labels of shape "
                         f"{labels.shape} and batch_size {batch_size}")
    model.check_labels(jnp.asarray(labels), allow_null=True)
    mesh = sampling_mesh(devices)
    graphdef, params = _replicated_split(model, mesh)
    requested = [labels[start : start + batch_size] for start in range(0, len(labels), batch_size)]
    keys = batch_keys(key, len(requested))
    mine = host_batches(len(requested), jax.process_index(), jax.process_count())
    local = []
    with tqdm(total=sum(len(requested[i]) for i in mine), unit="img", desc=desc,
              disable=not progress or jax.process_index() != 0) as bar:
        for index in mine:
            local.append(np.asarray(_sample_batch(graphdef, params, requested[index], keys[index], config, mesh)))
            bar.update(len(requested[index]))
    if jax.process_count() > 1:
        local = gather_host_batches(local, [len(b) for b in requested], batch_size, model.config.num_tokens)
    return np.concatenate(local).reshape(len(labels), *model.config.grid)


# ----------------------------------------------------------------------------- pictures of tokens


def tile(pictures, columns: int) -> np.ndarray:
    """uint8 pictures [n, H, W, 3] as one picture, `columns` a row, with a 1-pixel white border."""
    n, height, width, _ = pictures.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (height + 2), columns * (width + 2), 3), 255, np.uint8)
    for i, picture in enumerate(pictures):
        top, left = divmod(i, columns)
        top, left = top * (height + 2) + 1, left * (width + 2) + 1
        canvas[top : top + height, left : left + width] = picture
    return canvas


def token_grid_picture(tokens, vocab_size: int, columns: int, cell_pixels: int = 4) -> np.ndarray:
    """Token grids [n, h, w] as one uint8 RGB picture: each id a fixed colour, `columns` grids a row."""
    palette = np.random.default_rng(0).integers(0, 256, size=(vocab_size, 3), dtype=np.uint8)
    return tile(palette[np.asarray(tokens)].repeat(cell_pixels, axis=1).repeat(cell_pixels, axis=2), columns)


@nnx.jit
def _decode_codes(tokenizer, codes):
    """Module level, so that repeated decodes of one shape compile once."""
    return tokenizer.decode(codes)


def decode_to_uint8(tokenizer, tokens, batch_size: int) -> np.ndarray:
    """Token grids [n, h, w] -> uint8 RGB images [n, H, W, 3] (grey tokenizers repeated to RGB)."""
    images = np.concatenate([
        to_uint8(_decode_codes(tokenizer, jnp.asarray(tokens[start : start + batch_size])))
        for start in range(0, len(tokens), batch_size)
    ])
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


# ----------------------------------------------------------------------------- command line


def parse_classes(text: str, num_classes: int) -> list[int]:
    """'all' or comma-separated class ids."""
    if text == "all":
        return list(range(num_classes))
    try:
        classes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--classes must be 'all' or comma-separated ints, got {text!r}") from None
    if not classes:
        raise ValueError("--classes is empty")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes {bad} out of range [0, {num_classes - 1}]")
    return classes


def prepare_output_directory(out_dir: str, overwrite: bool) -> None:
    """Refuses an --out that is a file or already holds samples (unless `overwrite`), then creates it:
    before any sampling, so that a bad --out costs nothing."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file, not a directory; choose another --out")
    if os.path.exists(os.path.join(out_dir, "tokens.npz")) and not overwrite:
        raise ValueError(f"{out_dir}/tokens.npz exists; pass --overwrite or another --out")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out_dir} cannot be created: {error}") from None


def main(argv):
    del argv
    from absl import flags
    from PIL import Image

    FLAGS = flags.FLAGS
    out_dir = FLAGS.out
    initialize_from_environment(FLAGS.distributed)
    writer = jax.process_index() == 0   # with several processes, all sample and process 0 writes
    if (FLAGS.ckpt is None) == (not FLAGS.random_init):
        raise ValueError("give exactly one of --ckpt=DIR and --random_init")
    if FLAGS.ckpt is not None:
        params_dir, model_config = resolve_model(FLAGS.ckpt, FLAGS.config)
    elif FLAGS.config is None:
        raise ValueError("--random_init needs --config=... (the model to initialise)")
    else:
        params_dir, model_config = None, model_config_from(FLAGS.config)
    model_config = with_decode_state_dtype(model_config, FLAGS.decode_state_dtype)
    sampling = SamplingConfig(
        cfg_scale=FLAGS.cfg_scale, cfg_schedule=FLAGS.cfg_schedule, temperature=FLAGS.temperature,
        top_k=FLAGS.top_k, top_p=FLAGS.top_p,
    )
    classes = parse_classes(FLAGS.classes, model_config.num_classes)
    if FLAGS.num < 1 or FLAGS.batch_size < 1:
        raise ValueError(f"--num and --batch_size must be >= 1, got {FLAGS.num} and {FLAGS.batch_size}")
    if writer:
        prepare_output_directory(out_dir, FLAGS.overwrite)

    tokenizer = None
    if FLAGS.tokenizer is not None:
        tokenizer = load_tokenizer_for(FLAGS.tokenizer, model_config, "--tokenizer")

    model = LASADGen(model_config, rngs=nnx.Rngs(FLAGS.seed))
    if params_dir is not None:
        load_params(model, params_dir)
    model.eval()
    labels = np.repeat(np.asarray(classes, np.int32), FLAGS.num)
    started = time.perf_counter()
    tokens = generate_in_batches(model, labels, jax.random.PRNGKey(FLAGS.seed), sampling, FLAGS.batch_size,
                                 progress=True, desc=f"sampling {model_config.grid[0]}x{model_config.grid[1]} tokens")
    seconds = time.perf_counter() - started
    devices = f"{jax.device_count()} device(s)" + (f" of {jax.process_count()} processes" if jax.process_count() > 1
                                                   else "")
    if not writer:
        print(f"Process {jax.process_index()}: sampled its share of {len(tokens)} token grids in {seconds:.1f} s; "
              f"process 0 writes them.")
        return

    np.savez(os.path.join(out_dir, "tokens.npz"), tokens=tokens, labels=labels)
    picture = token_grid_picture(tokens, model_config.vocab_size, columns=FLAGS.num)
    Image.fromarray(picture).save(os.path.join(out_dir, "tokens.png"))
    written = f"{out_dir}/tokens.npz (tokens [n, h, w] int32, labels [n]), {out_dir}/tokens.png"
    if tokenizer is not None:
        images = decode_to_uint8(tokenizer, tokens, FLAGS.batch_size)
        np.savez(os.path.join(out_dir, "images.npz"), arr_0=images, labels=labels)
        Image.fromarray(tile(images, columns=FLAGS.num)).save(os.path.join(out_dir, "samples.png"))
        written += f", {out_dir}/images.npz (arr_0: uint8 {list(images.shape)}), {out_dir}/samples.png"
    with open(os.path.join(out_dir, "sampling.json"), "w") as f:
        json.dump({"classes": classes, "num_per_class": FLAGS.num, "seed": FLAGS.seed, "ckpt": params_dir,
                   "tokenizer": FLAGS.tokenizer,
                   "sampling": dataclasses.asdict(sampling), "model": dataclasses.asdict(model_config)}, f, indent=1)
    print(f"Sampled {len(tokens)} token grids in {seconds:.1f} s ({len(tokens) / seconds:.2f} images/s, compilation "
          f"included) on {devices}.")
    print(f"Wrote {len(tokens)} samples ({model_config.grid[0]}x{model_config.grid[1]} tokens, one row per "
          f"class in the pictures): {written}, and the settings to {out_dir}/sampling.json.")


def with_decode_state_dtype(model_config: ModelConfig, dtype: str | None) -> ModelConfig:
    """The model config with its LASAD decode-state storage replaced by `dtype` (None: unchanged)."""
    return model_config if dtype is None else dataclasses.replace(model_config, decode_state_dtype=dtype)


def define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Model config file, e.g. configs/imagenet256.py:size=L; default: "
                                    "the model recorded in --ckpt (its model.json)", lock_config=True)
    flags.DEFINE_string("ckpt", None, "Params directory (model_io.save_params, convert_llamagen) or a trainer "
                        "workdir (its params_ema).")
    flags.DEFINE_bool("random_init", False, "Sample from randomly initialised weights (smoke runs, benchmarks).")
    flags.DEFINE_string("classes", "0", "'all' or comma-separated class ids.")
    flags.DEFINE_integer("num", 4, "Samples per class.")
    flags.DEFINE_integer("batch_size", 32, "Images per jitted call, split over the local devices (a smaller "
                         "request runs a smaller batch).")
    flags.DEFINE_integer("seed", 0, "Random seed (initialisation with --random_init, and sampling).")
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1 = none).")
    flags.DEFINE_enum("cfg_schedule", "constant", list(CFG_SCHEDULES), "Guidance schedule over the cells.")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature (0 = greedy).")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
    flags.DEFINE_enum("decode_state_dtype", None, ["float32", "bfloat16"], "LASAD decode state storage (default: "
                      "the model's, float32 unless set); bfloat16 samples faster.")
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory: also decode the samples into images.")
    flags.DEFINE_string("out", "samples", "Output directory.")
    flags.DEFINE_bool("overwrite", False, "Replace existing outputs in --out.")
    flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"], "jax.distributed.initialize, as the trainer's "
                      "config.distributed.initialize (auto: when the environment names a coordinator or several "
                      "processes); every process samples a share of the batches, process 0 writes.")


if __name__ == "__main__":
    from lasadgen_jax import cli

    define_flags()
    cli.run(main)
