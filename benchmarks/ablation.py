"""Does 2D decay matter? The attention ablation, on Fashion-MNIST tokens of a 16x16 grid.

Three stages; only the second needs the GPU:

    # 1. here (CPU): the 16x16 tokenizer, then the bundle (train/test tokens, test images, the
    #    tokenizer, Inception weights packed to travel) in .ablation/bundle
    python -m lasadgen_jax.tokenizer.train --config=configs/vq_small.py:grid16 --workdir=.ablation/vq
    python3 benchmarks/ablation.py prepare --workdir .ablation
    # 2. GPU: per variant and seed, train configs/ablation.py, then test NLL, FID of 10k samples at
    #    CFG 1 and at the best scale of a sweep, training tokens/s, sampling images/s, learned decays.
    #    Runs already in --results are skipped, so a sweep can span several calls.
    python3 benchmarks/ablation.py run --bundle .ablation/bundle --results R.json --variants 2d,2d_row,1d,none,softmax
    # 3. anywhere: the markdown table and the PNGs (decays per head and layer, D(a, m) maps)
    python3 benchmarks/ablation.py report --results R.json --out benchmarks

Every variant sees the same batches in the same order (a permutation per epoch from the seed), the
same initialisation seed and the same steps; only `config.model.attention` changes.

FID: InceptionV3 pool3 of 10k samples against the 10k test images (both 32x32, resized to 299 in
the network). The weights travel rounded to float16 with a float32 scale per tensor (the float32
file is over the 64 MiB a device call carries); `prepare` prints their effect on pool3.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import time

import numpy as np
from ablation_figures import VARIANTS, decay_heatmap, receptive_fields, sample_grids, write_png

from lasadgen_jax.config_files import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE_PREFIX = "scale/"
META_PREFIX = "meta/"


def variant_config(attention: str):
    return load_config(os.path.join(REPO, "configs", "ablation.py") + f":attention={attention}")


# ============================================================================= 1. prepare (CPU)


MANTISSA_BITS = 8   # of float16's 10: the two lowest are rounded away so that the compressed file is smaller


def round_mantissa(values: np.ndarray) -> np.ndarray:
    """float16 values of magnitude <= 1 rounded to MANTISSA_BITS mantissa bits (to nearest, on the bit pattern)."""
    drop = 10 - MANTISSA_BITS
    bits = values.view(np.uint16).astype(np.uint32)
    bits = (bits + (1 << (drop - 1))) & ~np.uint32((1 << drop) - 1)
    return bits.astype(np.uint16).view(np.float16)


def pack_inception(src: str, dst: str) -> None:
    """float32 weights -> float16 of w / max|w| (MANTISSA_BITS mantissa bits) plus that scale (float32), per
    tensor, compressed: the bundle and the working tree travel to the GPU within 64 MiB."""
    out = {}
    with np.load(src, allow_pickle=False) as npz:
        for name in npz.files:
            value = npz[name]
            if name.startswith(META_PREFIX):
                out[name] = value
                continue
            scale = np.float32(np.max(np.abs(value))) or np.float32(1.0)
            out[name] = round_mantissa((value / scale).astype(np.float16))
            out[SCALE_PREFIX + name] = np.asarray(scale, np.float32)
    out[META_PREFIX + "packing"] = np.asarray(f"float16 of w / max|w| per tensor with {MANTISSA_BITS} mantissa bits, "
                                              "scale/<name> float32")
    np.savez_compressed(dst, **out)


def unpack_inception(src: str, dst: str) -> str:
    """The inverse of pack_inception: a float32 npz that lasadgen_jax.eval loads."""
    out = {}
    with np.load(src, allow_pickle=False) as npz:
        for name in npz.files:
            if name.startswith(SCALE_PREFIX) or name == META_PREFIX + "packing":
                continue
            value = npz[name]
            if not name.startswith(META_PREFIX):
                value = value.astype(np.float32) * npz[SCALE_PREFIX + name]
            out[name] = value
    np.savez(dst, **out)
    return dst


def encode_split(tokenizer, images: np.ndarray, batch_size: int) -> np.ndarray:
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    encode = nnx.jit(lambda model, x: model.encode(x))
    codes = []
    for start in tqdm(range(0, len(images), batch_size), desc="tokenizing", unit="batch"):
        batch = images[start:start + batch_size]
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)])
        codes.append(np.asarray(encode(tokenizer, jnp.asarray(padded, jnp.float32) / 127.5 - 1.0))[: len(batch)])
    return np.concatenate(codes)


def pool3_error_of_packing(full: str, unpacked: str, images: np.ndarray) -> float:
    from lasadgen_jax.eval.features import FeatureExtractor

    exact = FeatureExtractor(full, batch_size=len(images)).features_of_array(images, progress=False).pool3
    packed = FeatureExtractor(unpacked, batch_size=len(images)).features_of_array(images, progress=False).pool3
    return float(np.linalg.norm(packed - exact) / np.linalg.norm(exact))


def prepare(args) -> None:
    from lasadgen_jax.data import fashion_mnist
    from lasadgen_jax.tokenizer.checkpoint import load_tokenizer

    tokenizer_dir = os.path.join(args.workdir, "vq", "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        sys.exit(f"no tokenizer in {tokenizer_dir}: train it first with\n  python -m lasadgen_jax.tokenizer.train "
                 f"--config=configs/vq_small.py:grid16 --workdir={os.path.join(args.workdir, 'vq')}")
    inception = os.path.expanduser(args.inception)
    if not os.path.isfile(inception):
        sys.exit(f"no Inception weights at {inception}: write them with "
                 f"python -m lasadgen_jax.eval.convert_inception --out {os.path.dirname(inception)}")
    bundle = os.path.join(args.workdir, "bundle")
    os.makedirs(bundle, exist_ok=True)

    tokenizer = load_tokenizer(tokenizer_dir)
    arrays = {}
    for split in ("train", "test"):
        images, labels = fashion_mnist.load_fashion_mnist(split)
        codes = encode_split(tokenizer, images, args.batch_size)
        if codes.shape[1:] != (16, 16) or codes.max() >= 1024:
            raise ValueError(f"the tokenizer in {tokenizer_dir} gives codes {codes.shape[1:]} up to {codes.max()}; "
                             "the ablation needs a 16x16 grid of at most 1024 codes (configs/vq_small.py:grid16)")
        arrays[f"{split}_tokens"] = codes.astype(np.uint16)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
        print(f"{split}: {codes.shape[0]} images -> tokens {codes.shape[1:]}, {len(np.unique(codes))} codes used")
    np.savez_compressed(os.path.join(bundle, "tokens.npz"), **arrays)

    images_dir = os.path.join(bundle, "fashion_mnist")
    os.makedirs(images_dir, exist_ok=True)
    for name in fashion_mnist.SPLIT_FILES["test"]:
        shutil.copyfile(os.path.join(fashion_mnist.resolve_location().root, name), os.path.join(images_dir, name))
    shutil.copytree(tokenizer_dir, os.path.join(bundle, "tokenizer"), dirs_exist_ok=True)

    packed = os.path.join(bundle, "inception_packed.npz")
    pack_inception(inception, packed)
    unpacked = unpack_inception(packed, os.path.join(args.workdir, "inception_unpacked.npz"))
    test_images, _ = fashion_mnist.load_fashion_mnist("test")
    error = pool3_error_of_packing(inception, unpacked, test_images[:8])
    with open(os.path.join(bundle, "packing.json"), "w") as f:
        json.dump({"pool3_relative_error_8_test_images": error}, f)
    names = ("tokens.npz", "inception_packed.npz")
    sizes = {name: os.path.getsize(os.path.join(bundle, name)) / 2**20 for name in names}
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(bundle) for f in files) / 2**20
    print(f"bundle {bundle}: {total:.1f} MiB ({', '.join(f'{k} {v:.1f}' for k, v in sizes.items())}); "
          f"pool3 relative error of the packed Inception weights on 8 test images: {error:.2e}")


# ============================================================================= 2. run (GPU)


@dataclasses.dataclass
class Bundle:
    train_tokens: np.ndarray   # int32 [N, 256]
    train_labels: np.ndarray   # int32 [N]
    test_tokens: np.ndarray
    test_labels: np.ndarray
    test_images: np.ndarray    # uint8 [M, 32, 32, 3]
    tokenizer: object
    inception: str             # a float32 weights file


def bundle_test_images(directory: str) -> tuple[np.ndarray, np.ndarray]:
    """The test split the bundle carries, as fashion_mnist.load_fashion_mnist gives it (32x32 RGB uint8,
    int32 labels), read from its two IDX files: the loader's data locations must hold all four files."""
    from lasadgen_jax.data import fashion_mnist

    images_path, labels_path = fashion_mnist.split_paths("test", directory)
    images = fashion_mnist.read_idx_uint8(images_path, ndim=3)
    labels = fashion_mnist.read_idx_uint8(labels_path, ndim=1)
    pad = (fashion_mnist.IMAGE_SIZE - images.shape[1]) // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return np.repeat(padded[..., None], 3, axis=-1), labels.astype(np.int32)


def load_bundle(bundle: str, scratch: str) -> Bundle:
    from lasadgen_jax.tokenizer.checkpoint import load_tokenizer

    with np.load(os.path.join(bundle, "tokens.npz"), allow_pickle=False) as npz:
        tokens = {name: npz[name] for name in npz.files}
    flat = lambda codes: codes.reshape(len(codes), -1).astype(np.int32)
    test_images, test_labels = bundle_test_images(os.path.join(bundle, "fashion_mnist"))
    if not np.array_equal(test_labels, tokens["test_labels"]):
        raise ValueError(f"{bundle}: the test images' labels differ from the test tokens' labels")
    os.makedirs(scratch, exist_ok=True)
    inception = unpack_inception(os.path.join(bundle, "inception_packed.npz"), os.path.join(scratch, "inception.npz"))
    return Bundle(flat(tokens["train_tokens"]), tokens["train_labels"].astype(np.int32),
                  flat(tokens["test_tokens"]), tokens["test_labels"].astype(np.int32), test_images,
                  load_tokenizer(os.path.join(bundle, "tokenizer")), inception)


def batch_order(num_examples: int, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
    """[num_steps, batch_size] example indices: a fresh permutation each epoch, the tail of an epoch dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = num_examples // batch_size
    epochs = -(-num_steps // per_epoch)
    order = np.concatenate([rng.permutation(num_examples)[: per_epoch * batch_size] for _ in range(epochs)])
    return order[: num_steps * batch_size].reshape(num_steps, batch_size)


def train_variant(config, data: Bundle, mesh, log, initial_params: dict | None = None,
                  first_batch: int = 0) -> tuple[dict, object, dict]:
    """(final params, graphdef + rng template, training stats) for one config. initial_params: start
    from these (a pure dict) instead of a fresh initialisation; first_batch: skip that many batches of
    the seed's order (a run that continues another one sees the batches that run would have seen next)."""
    import jax

    from lasadgen_jax import train, train_state
    from lasadgen_jax.model_io import model_config_from

    model_config = model_config_from(config)
    setup = train_state.setup_training(config, model_config, mesh, config.num_steps)
    if initial_params is None:
        state = setup.initial_state(model_config, config.seed)
    else:
        state = setup.state_from_params(initial_params)
    order = batch_order(len(data.train_tokens), config.batch_size, first_batch + config.num_steps,
                        config.seed)[first_batch:]
    losses, started = [], time.perf_counter()
    pending = []
    for step in range(config.num_steps):
        index = order[step]
        local = {"tokens": data.train_tokens[index], "label": data.train_labels[index]}
        tokens, labels = train.global_batch(local, mesh)
        state, metrics = setup.train_step(state, tokens, labels)
        if step == 0:
            metrics["loss"].block_until_ready()
            compiled_at = time.perf_counter()
            compile_seconds = compiled_at - started
        pending.append(metrics["loss"])
        if (step + 1) % config.ablation.log_every == 0 or step + 1 == config.num_steps:
            mean = float(np.mean(jax.device_get(pending)))
            losses.append((step + 1, mean))
            pending = []
            log(f"  step {step + 1}/{config.num_steps}: loss {mean:.4f} "
                f"({(step) / (time.perf_counter() - compiled_at):.1f} steps/s)")
    jax.block_until_ready(state["params"])
    seconds = time.perf_counter() - compiled_at
    skipped = int(state["skipped_steps"])
    if skipped:
        raise FloatingPointError(f"{skipped} steps had a non-finite loss or gradient")
    tokens_per_step = config.batch_size * model_config.num_tokens
    stats = dict(compile_seconds=round(compile_seconds, 1), train_seconds=round(seconds, 1),
                 step_ms=round(1e3 * seconds / (config.num_steps - 1), 2),
                 tokens_per_second=round(tokens_per_step * (config.num_steps - 1) / seconds),
                 loss_curve=losses, final_train_loss=losses[-1][1])
    return state["params"], setup, stats


def eval_model(setup, params):
    import jax
    from flax import nnx

    from lasadgen_jax.train_state import seeded_rng_state

    model = nnx.merge(setup.graphdef, params, seeded_rng_state(setup.rng_state_template, jax.random.key(0)))
    model.eval()
    return model


def nll_bits_per_token(model, data: Bundle, batch_size: int) -> float:
    """Mean negative log-likelihood of the test tokens given their class, in bits per token."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    @nnx.jit
    def summed_nll(model, tokens, labels, valid):
        nll = optax.softmax_cross_entropy_with_integer_labels(model(tokens, labels), tokens)
        return jnp.sum(nll * valid[:, None])

    total = 0.0
    for start in range(0, len(data.test_tokens), batch_size):
        tokens, labels = data.test_tokens[start:start + batch_size], data.test_labels[start:start + batch_size]
        valid = np.zeros(batch_size, np.float32)
        valid[: len(tokens)] = 1.0
        pad = batch_size - len(tokens)
        total += float(summed_nll(model, jnp.asarray(np.pad(tokens, ((0, pad), (0, 0)))),
                                  jnp.asarray(np.pad(labels, (0, pad))), jnp.asarray(valid)))
    return total / data.test_tokens.size / np.log(2.0)


def fid_of(images: np.ndarray, extractor, reference) -> float:
    from lasadgen_jax.eval import metrics

    pool3 = extractor.features_of_array(images, progress=False).pool3
    mu, sigma = metrics.feature_statistics(pool3)
    return float(metrics.frechet_distance(mu, sigma, reference.mu, reference.sigma))


def sample_and_score(model, data: Bundle, extractor, reference, ablation, seed: int, log) -> dict:
    import jax

    from lasadgen_jax.eval.scores import sample_images
    from lasadgen_jax.sample import SamplingConfig

    key = jax.random.key(1000 + seed)
    draw = lambda count, scale, tag: sample_images(model, data.tokenizer, count, jax.random.fold_in(key, tag),
                                                   SamplingConfig(cfg_scale=scale), batch_size=ablation.sample_batch,
                                                   progress=False)[0]
    started = time.perf_counter()
    draw(ablation.sample_batch, 1.0, 0)          # compiles the unguided sampler and the decoder
    draw(ablation.sample_batch, 2.0, 0)          # ... and the guided one (every scale shares it)
    compile_seconds = time.perf_counter() - started

    started = time.perf_counter()
    images = draw(ablation.fid_samples, 1.0, 1)
    images_per_second = ablation.fid_samples / (time.perf_counter() - started)
    result = dict(sampling_compile_seconds=round(compile_seconds, 1),
                  sampling_images_per_second=round(images_per_second, 1), fid_cfg1=fid_of(images, extractor, reference))
    log(f"  FID cfg 1.0 ({ablation.fid_samples} samples): {result['fid_cfg1']:.2f}; "
        f"{images_per_second:.0f} images/s (batch {ablation.sample_batch})")
    sweep = {}
    for index, scale in enumerate(ablation.cfg_sweep):
        sweep[str(scale)] = fid_of(draw(ablation.sweep_samples, scale, 2 + index), extractor, reference)
    best = min(sweep, key=sweep.get)
    log(f"  CFG sweep ({ablation.sweep_samples} samples each): "
        + ", ".join(f"{s}: {f:.2f}" for s, f in sweep.items()) + f" -> {best}")
    started = time.perf_counter()
    images = draw(ablation.fid_samples, float(best), 99)
    result.update(cfg_sweep_fid=sweep, best_cfg=float(best), fid_best_cfg=fid_of(images, extractor, reference),
                  guided_images_per_second=round(ablation.fid_samples / (time.perf_counter() - started), 1))
    log(f"  FID cfg {best} ({ablation.fid_samples} samples): {result['fid_best_cfg']:.2f}")
    grid = np.concatenate([images[np.arange(len(images)) % 10 == c][:10] for c in range(10)])
    result["_sample_grid"] = grid   # 10 x 10 images at the best scale, one row per class (not in the JSON)
    return result


def learned_decays(model) -> dict:
    """Per layer, the heads' decays g = exp(log g) (None where the variant has no such axis)."""
    rows, cols = [], []
    for block in model.blocks:
        if not hasattr(block.attention, "log_decays"):
            return {}
        log_row, log_col = block.attention.log_decays()
        rows.append(None if log_row is None else np.exp(np.asarray(log_row, np.float64)).tolist())
        cols.append(None if log_col is None else np.exp(np.asarray(log_col, np.float64)).tolist())
    return {"decay_row": rows, "decay_col": cols}


def write_results(path: str, results: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def run(args) -> None:
    import flax
    import jax

    from lasadgen_jax import sharding
    from lasadgen_jax.eval.features import FeatureExtractor
    from lasadgen_jax.eval.reference import reference_from_features
    from lasadgen_jax.model_io import model_config_from
    from lasadgen_jax.models.lasadgen import count_params

    started = time.perf_counter()
    log = lambda text: print(f"[{time.perf_counter() - started:6.0f}s] {text}", flush=True)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {VARIANTS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    if os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    done = {(r["variant"], r["seed"]) for r in results}

    data = load_bundle(args.bundle, args.scratch)
    if args.smoke:   # a minutes-long CPU check of the whole path, numbers meaningless
        data = dataclasses.replace(data, test_tokens=data.test_tokens[:40], test_labels=data.test_labels[:40],
                                   test_images=data.test_images[:40])
    extractor = FeatureExtractor(data.inception, batch_size=10 if args.smoke else 500)
    test_features = extractor.features_of_array(data.test_images, progress=False)
    reference = reference_from_features("fashion_mnist:test", test_features.pool3)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices())
    log(f"bundle: {len(data.train_tokens)} train / {len(data.test_tokens)} test sequences; reference features done; "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}")

    seconds_per_run = {r["variant"]: r["run_seconds"] for r in results}   # the deadline's estimates
    for seed in seeds:
        for variant in variants:
            if (variant, seed) in done:
                log(f"{variant} seed {seed}: in {args.results} already, skipped")
                continue
            elapsed = time.perf_counter() - started
            estimate = seconds_per_run.get(variant, args.first_run_estimate)
            if elapsed + 1.2 * estimate > args.deadline:
                log(f"stopping before {variant} seed {seed}: {elapsed:.0f}s spent, a run takes ~{estimate:.0f}s, "
                    f"deadline {args.deadline:.0f}s")
                return
            run_started = time.perf_counter()
            config = variant_config(variant)
            config.unlock()
            config.seed = seed
            if args.smoke:
                shrink_for_smoke(config)
            num_params = count_params(model_config_from(config))
            log(f"{variant} seed {seed}: {num_params / 1e6:.1f}M params, "
                f"{config.num_steps} steps of {config.batch_size}")
            params, setup, train_stats = train_variant(config, data, mesh, log)
            model = eval_model(setup, params)
            nll = nll_bits_per_token(model, data, config.ablation.eval_batch)
            log(f"  test NLL {nll:.4f} bits/token; train {train_stats['tokens_per_second']:,} tokens/s "
                f"({train_stats['step_ms']} ms/step, compile {train_stats['compile_seconds']}s)")
            scores = sample_and_score(model, data, extractor, reference, config.ablation, seed, log)
            grid = scores.pop("_sample_grid")
            if args.grids_dir:
                os.makedirs(args.grids_dir, exist_ok=True)
                np.save(os.path.join(args.grids_dir, f"samples_{variant}_seed{seed}.npy"), grid)
            results.append(dict(
                variant=variant, seed=seed, steps=config.num_steps, batch_size=config.batch_size,
                params=num_params, test_nll_bits_per_token=nll, **train_stats, **scores,
                decays=learned_decays(model), run_seconds=round(time.perf_counter() - run_started, 1),
                device=jax.devices()[0].device_kind, jax=jax.__version__, flax=flax.__version__,
                lasad_impl=resolved_impl(config), date=datetime.date.today().isoformat()))
            write_results(args.results, results)
            seconds_per_run[variant] = results[-1]["run_seconds"]
            log(f"{variant} seed {seed} done in {results[-1]['run_seconds']:.0f}s")
            del params, model, setup
            jax.clear_caches()


def resolved_impl(config) -> str | None:
    """The LASAD algorithm the training forward ran ('auto' resolved on this backend); None for softmax."""
    from lasadgen_jax.ops import lasad

    if config.model.attention == "softmax":
        return None
    grid = config.model.grid
    return lasad.resolve_impl(config.model.lasad_impl, config.model.attention, tokens=grid[0] * grid[1])


def shrink_for_smoke(config) -> None:
    config.model.update(depth=2, dim=64, num_heads=2)
    config.update(batch_size=8, num_steps=3)
    config.optimizer.warmup_steps = 1
    config.ablation.update(fid_samples=20, sweep_samples=10, cfg_sweep=(2.0,), sample_batch=10, eval_batch=16,
                           log_every=1)


# ============================================================================= 3. report


def render_table(results: list) -> str:
    lines = ["| attention | seed | test NLL (bits/token) | FID, CFG 1 | best CFG (sweep FID) | FID, best CFG | "
             "train tokens/s | sampling images/s (CFG 1 / guided) | final train loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(results, key=lambda r: (order[r["variant"]], r["seed"])):
        sweep = ", ".join(f"{s}: {f:.1f}" for s, f in r["cfg_sweep_fid"].items())
        lines.append(f"| `{r['variant']}` | {r['seed']} | {r['test_nll_bits_per_token']:.4f} | {r['fid_cfg1']:.2f} | "
                     f"{r['best_cfg']} ({sweep}) | {r['fid_best_cfg']:.2f} | {r['tokens_per_second']:,} | "
                     f"{r['sampling_images_per_second']:,.0f} / {r['guided_images_per_second']:,.0f} | "
                     f"{r['final_train_loss']:.4f} |")
    return "\n".join(lines)


def report(args) -> None:
    results = []
    for path in args.results:
        with open(path) as f:
            results.extend(json.load(f))
    print(render_table(results))
    os.makedirs(args.out, exist_ok=True)
    pictures, fields = [], []
    for variant in ("2d", "2d_row", "1d"):
        runs = [r for r in results if r["variant"] == variant and r["seed"] == 0]
        if not runs:
            continue
        pictures.append(decay_heatmap(runs[0]))
        depth = len(runs[0]["decays"]["decay_col"])
        fields.extend(receptive_fields(runs[0], layer) for layer in (0, depth // 2, depth - 1))
    stack = lambda tiles: np.concatenate([np.pad(t, ((0, 8), (0, max(x.shape[1] for x in tiles) - t.shape[1]), (0, 0)),
                                                 constant_values=255) for t in tiles])
    if pictures:
        write_png(os.path.join(args.out, "ablation_decays.png"), stack(pictures))
        write_png(os.path.join(args.out, "ablation_receptive_fields.png"), stack(fields))
    grids = sample_grids(args.grids) if args.grids else None
    if grids is not None:
        write_png(os.path.join(args.out, "ablation_samples.png"), grids)


# ============================================================================= command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare",
                       help="CPU: tokens, test images, tokenizer and packed Inception weights -> WORKDIR/bundle")
    p.add_argument("--workdir", default=".ablation")
    p.add_argument("--inception", default=".ablation/inception/inception_v3_fid.npz",
                   help="float32 weights from python -m lasadgen_jax.eval.convert_inception")
    p.add_argument("--batch_size", type=int, default=500)
    r = sub.add_parser("run", help="GPU: train and evaluate each variant; appends to --results")
    r.add_argument("--bundle", required=True)
    r.add_argument("--results", required=True, help="JSON list; (variant, seed) pairs in it are skipped")
    r.add_argument("--variants", default=",".join(VARIANTS))
    r.add_argument("--seeds", default="0")
    r.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, 20 samples: checks the path on a CPU")
    r.add_argument("--deadline", type=float, default=1e9, help="seconds: no run starts that would end after it")
    r.add_argument("--first_run_estimate", type=float, default=120.0,
                   help="seconds a variant not run yet is assumed to take (deadline)")
    r.add_argument("--scratch", default="/tmp/ablation")
    r.add_argument("--grids_dir", default="", help="where 10x10 sample grids (npy) go")
    o = sub.add_parser("report", help="the table and PNGs from results JSON files")
    o.add_argument("--results", nargs="+", required=True)
    o.add_argument("--out", default="benchmarks")
    o.add_argument("--grids", default="", help="the run stage's --grids_dir (sample grids -> ablation_samples.png)")
    args = parser.parse_args()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')} {platform.node()} python {sys.version.split()[0]}",
          flush=True)
    {"prepare": prepare, "run": run, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
