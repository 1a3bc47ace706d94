"""FID, sFID, Inception Score, precision and recall of generated images (ADM's definitions).

    python -m lasadgen_jax.evaluate --samples=S.npz --ref=VIRTUAL_imagenet256_labeled.npz --out=result.json
    python -m lasadgen_jax.evaluate --ckpt=WORKDIR --tokenizer=tokenizers/vq16 --num_samples=50000 \
        --cfg_scale=4 --ref=R.npz --out=result.json

The first form reads `arr_0` (uint8 [N, H, W, 3]) of an npz (what `python -m lasadgen_jax.sample
--tokenizer=...` writes); the second samples the images first, class labels cycling through every
class (balanced), from a params directory or a trainer workdir (the model read from its model.json;
a --config must agree with it). `--eval_image_size=256` resizes the samples first (PIL bicubic):
LlamaGen's protocol for 384 px samples against the 256 px reference. `--ref` is an ADM-style npz or
`fashion_mnist:test` (see eval/reference.py). Inception weights come from
`python -m lasadgen_jax.eval.convert_inception --out=DIR` (--inception,
default ~/.cache/lasadgen_jax/inception/inception_v3_fid.npz). The result is printed and, with
--out, written as JSON. The library behind it is lasadgen_jax/eval/scores.py (`sample_and_evaluate`,
also the trainer's periodic evals). Started on several hosts (jax.distributed, --distributed), every
process samples a share of the batches and process 0 scores them and writes.
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

from lasadgen_jax.distributed import initialize_from_environment
from lasadgen_jax.eval.features import FeatureExtractor, stream_npz_images
from lasadgen_jax.eval.reference import (
    check_reference_file,
    is_dataset_spec,
    load_reference,
)
from lasadgen_jax.eval.scores import compute_metrics, parse_metrics, sample_images
from lasadgen_jax.model_io import load_params, load_tokenizer_for, resolve_model
from lasadgen_jax.models.lasadgen import LASADGen
from lasadgen_jax.sample import CFG_SCHEDULES, SamplingConfig, with_decode_state_dtype

DEFAULT_INCEPTION = os.path.join("~", ".cache", "lasadgen_jax", "inception", "inception_v3_fid.npz")
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "lasadgen_jax", "reference")


# Fewer samples than this give a visibly biased FID (it falls as N grows); ADM and LlamaGen report 50k.
FID_MIN_SAMPLES = 10_000


# ----------------------------------------------------------------------------- resizing (LlamaGen's 384 protocol)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images [n, H, W, C] resized to [n, size, size, C] with PIL's bicubic filter: what LlamaGen does to
    its 384 px samples before an FID against the 256 px ImageNet reference."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    grey = images.shape[-1] == 1
    resized = [np.asarray(Image.fromarray(image[..., 0] if grey else image).resize((size, size), Image.BICUBIC))
               for image in images]
    stacked = np.stack(resized)
    return stacked[..., None] if grey else stacked


def resized_batches(batches, size: int | None):
    return batches if size is None else (resize_images(batch, size) for batch in batches)


# ----------------------------------------------------------------------------- command line


def _model_from_flags(FLAGS):
    if FLAGS.tokenizer is None:
        raise ValueError("sampling needs --ckpt and --tokenizer (and --config unless --ckpt records its model), "
                         "or pass --samples=S.npz")
    params_dir, model_config = resolve_model(FLAGS.ckpt, FLAGS.config)
    model_config = with_decode_state_dtype(model_config, FLAGS.decode_state_dtype)
    tokenizer = load_tokenizer_for(FLAGS.tokenizer, model_config, "--tokenizer")
    model = load_params(LASADGen(model_config, rngs=nnx.Rngs(0)), params_dir)
    model.eval()
    return params_dir, model, tokenizer


def check_output_file(flag: str, path: str | None, overwrite: bool) -> None:
    """Refuses an existing output file (without --overwrite) or one whose directory cannot be made; creates
    the directory: before minutes of sampling and features."""
    if not path:
        return
    if os.path.isdir(path):
        raise ValueError(f"--{flag} {path} is a directory; give a file path")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"--{flag} {path} exists; pass --overwrite or another path")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--{flag} {path}: its directory cannot be created ({error})") from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--{flag} {path}: {parent} is not writable")


def main(argv):
    del argv
    from absl import flags

    FLAGS = flags.FLAGS
    metrics, explicit = parse_metrics(FLAGS.metrics)
    if (FLAGS.samples is None) == (FLAGS.ckpt is None):
        raise ValueError("give either --samples=S.npz or --ckpt/--tokenizer to sample")
    if FLAGS.eval_image_size is not None and FLAGS.eval_image_size < 1:
        raise ValueError(f"--eval_image_size must be >= 1, got {FLAGS.eval_image_size}")
    initialize_from_environment(FLAGS.distributed)
    scorer = jax.process_index() == 0   # with several processes, all sample and process 0 scores and writes
    if FLAGS.samples is not None and not scorer:
        return
    if scorer:
        for flag in ("out", "save_samples"):
            check_output_file(flag, getattr(FLAGS, flag), FLAGS.overwrite)
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
        source = {"samples": FLAGS.samples}
    else:
        params_dir, model, tokenizer = _model_from_flags(FLAGS)
        sampling = SamplingConfig(cfg_scale=FLAGS.cfg_scale, cfg_schedule=FLAGS.cfg_schedule,
                                  temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
        sampling_started = time.time()
        images, labels = sample_images(model, tokenizer, FLAGS.num_samples, jax.random.PRNGKey(FLAGS.seed),
                                       sampling, FLAGS.batch_size)
        seconds = time.time() - sampling_started
        processes = f" of {jax.process_count()} processes" if jax.process_count() > 1 else ""
        print(f"sampled and decoded {len(images)} images in {seconds:.1f} s ({len(images) / seconds:.2f} images/s, "
              f"compilation included) on {jax.device_count()} device(s){processes}", file=sys.stderr)
        if not scorer:
            return
        if FLAGS.save_samples:
            np.savez(FLAGS.save_samples, arr_0=images, labels=labels)
        total = len(images)
        batches = (images[start:start + FLAGS.feature_batch_size]
                   for start in range(0, total, FLAGS.feature_batch_size))
        source = {"ckpt": params_dir, "tokenizer": FLAGS.tokenizer, "seed": FLAGS.seed,
                  "sampling": dataclasses.asdict(sampling)}
    if total < FID_MIN_SAMPLES and "fid" in metrics:
        print(f"warning: FID of {total} samples (fewer than {FID_MIN_SAMPLES}) is biased upwards; compare it only "
              f"with FIDs of the same number of samples (50000 for published numbers)", file=sys.stderr)
    features = extractor(resized_batches(batches, FLAGS.eval_image_size), total=total, desc="sample features")
    reference = load_reference(FLAGS.ref, extractor, cache_dir,
                               with_radii="precision" in metrics or "recall" in metrics)
    result = compute_metrics(features, reference, metrics, explicit)
    result.update(source, inception_weights_sha256=extractor.weights_id, precision_mode=FLAGS.precision,
                  eval_image_size=FLAGS.eval_image_size, seconds=round(time.time() - started, 1))
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text, flush=True)  # printed first: a failing write must not lose the result
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")


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
    config_flags.DEFINE_config_file("config", None, "Model config to sample from, e.g. configs/imagenet256.py:size=L; "
                                    "default: the model recorded in --ckpt (its model.json)", lock_config=True)
    flags.DEFINE_string("ckpt", None, "Params directory or trainer workdir (its params_ema) to sample from.")
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory (decodes the sampled tokens).")
    flags.DEFINE_integer("num_samples", 50000, "Images to sample.")
    flags.DEFINE_enum("decode_state_dtype", None, ["float32", "bfloat16"], "LASAD decode state storage (default: "
                      "the model's, float32 unless set); bfloat16 samples faster.")
    flags.DEFINE_integer("batch_size", 64, "Images per sampling call.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1 = none).")
    flags.DEFINE_enum("cfg_schedule", "constant", list(CFG_SCHEDULES), "Guidance schedule over the cells.")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature (0 = greedy).")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
    flags.DEFINE_integer("eval_image_size", None, "Resize the samples to N x N (PIL bicubic) before the Inception "
                         "features, e.g. 256 for LlamaGen's 384 px protocol (default: as they are).")
    flags.DEFINE_string("save_samples", None, "Also write the sampled images here (npz, arr_0 + labels).")
    flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"], "jax.distributed.initialize, as the trainer's "
                      "config.distributed.initialize; every process samples a share of the batches, process 0 "
                      "scores them and writes.")
    flags.mark_flag_as_required("ref")


if __name__ == "__main__":
    from lasadgen_jax import cli

    define_flags()
    cli.run(main)
