"""FID, sFID, Inception Score, precision and recall of generated images (ADM's definitions).

    python -m lasadgen_jax.evaluate --samples=S.npz --ref=VIRTUAL_imagenet256_labeled.npz --out=result.json
    python -m lasadgen_jax.evaluate --config=configs/imagenet256.py:size=L --ckpt=DIR \
        --tokenizer=tokenizers/vq16 --num_samples=50000 --cfg_scale=4 --ref=R.npz --out=result.json

The first form reads `arr_0` (uint8 [N, H, W, 3]) of an npz (what `python -m lasadgen_jax.sample
--tokenizer=...` writes); the second samples the images first, class labels cycling through every
class (balanced). `--ref` is an ADM-style npz or `fashion_mnist:test` (see eval/reference.py).
Inception weights come from `python -m lasadgen_jax.eval.convert_inception --out DIR` (--inception,
default ~/.cache/lasadgen_jax/inception/inception_v3_fid.npz). The result is printed and, with
--out, written as JSON. The library behind it is lasadgen_jax/eval/scores.py (`sample_and_evaluate`,
also the trainer's periodic evals).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from lasadgen_jax.eval.features import FeatureExtractor, stream_npz_images
from lasadgen_jax.eval.reference import (
    check_reference_file,
    is_dataset_spec,
    load_reference,
)
from lasadgen_jax.eval.scores import compute_metrics, parse_metrics, sample_images
from lasadgen_jax.model_io import load_params, load_tokenizer_for, model_config_from
from lasadgen_jax.models.lasadgen import LASADGen
from lasadgen_jax.sample import CFG_SCHEDULES, SamplingConfig

DEFAULT_INCEPTION = os.path.join("~", ".cache", "lasadgen_jax", "inception", "inception_v3_fid.npz")
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "lasadgen_jax", "reference")


# ----------------------------------------------------------------------------- command line


def _model_from_flags(FLAGS):
    if FLAGS.config is None or FLAGS.ckpt is None or FLAGS.tokenizer is None:
        raise ValueError("sampling needs --config, --ckpt and --tokenizer together (or pass --samples=S.npz)")
    model_config = model_config_from(FLAGS.config)
    model = load_params(LASADGen(model_config, rngs=nnx.Rngs(0)), FLAGS.ckpt)
    model.eval()
    return model, load_tokenizer_for(FLAGS.tokenizer, model_config, "--tokenizer")


def main(argv):
    del argv
    from absl import flags

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
