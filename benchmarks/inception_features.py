"""Inception features/s and the time of the whole 50k-sample metric path (FID, sFID, IS, precision/recall).

    python3 benchmarks/inception_features.py --weights ~/.cache/lasadgen_jax/inception/inception_v3_fid.npz \
        --batch 500 --image_size 256 --num_samples 50000 --num_reference 10000

1. Features: the jitted network (TF1 bilinear resize to 299 inside) on uint8 batches of
   `--batch` images of `--image_size` (256: ImageNet-256 samples, resized as the TF graph does),
   once with the conv precision 'highest' (float32; the default) and once 'default' (TF32 on GPU),
   timed over `--steps` batches after a warm-up, device-to-host transfer of the features included.
2. Metrics on synthetic features of the sizes of an ADM ImageNet evaluation (`--num_samples`
   samples, `--num_reference` reference images): statistics, FID and sFID, IS, precision/recall.
   Precision/recall is quadratic in the counts: with `--pr_scale` < 1 it runs on that fraction
   of both sets and is scaled up by 1/pr_scale^2 (for CPUs).
3. The estimate for evaluating `--num_samples` samples = their features + the reference's + (2).
`--check FILE.npz` (images + expected pool3) reports the relative error of this device's pool3
against features computed elsewhere (e.g. on CPU) with the same weights; `--write_check` writes one.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

from lasadgen_jax.eval import metrics
from lasadgen_jax.eval.features import FeatureExtractor


def time_features(extractor: FeatureExtractor, batch: np.ndarray, steps: int) -> float:
    """Images per second of extractor._run on one batch, best of `steps` after a warm-up."""
    extractor._run(batch)  # compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        extractor._run(batch)  # returns host numpy arrays: the transfer is included
        times.append(time.perf_counter() - start)
    return len(batch) / min(times)


def time_metrics(num_samples: int, num_reference: int, pr_scale: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    # Inception-like features: non-negative (post-ReLU average pool), correlated.
    mixing = rng.normal(size=(64, 2048)).astype(np.float32) / 8
    make = lambda n, dim: np.maximum(rng.normal(size=(n, 64)).astype(np.float32) @ mixing[:, :dim], 0)
    samples, reference = make(num_samples, 2048), make(num_reference, 2048)
    samples_spatial, reference_spatial = make(num_samples, 2023), make(num_reference, 2023)
    logits = rng.normal(size=(num_samples, 1008)).astype(np.float32)
    out = {}
    start = time.perf_counter()
    stats = [metrics.feature_statistics(x) for x in (samples, reference, samples_spatial, reference_spatial)]
    out["statistics_s"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics.frechet_distance(*stats[0], *stats[1])
    metrics.frechet_distance(*stats[2], *stats[3])
    out["fid_and_sfid_s"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics.inception_score(logits)
    out["inception_score_s"] = time.perf_counter() - start
    n_pr, m_pr = int(num_samples * pr_scale), int(num_reference * pr_scale)
    metrics.precision_recall(reference[:64], samples[:64])  # compile the block shapes' code paths
    start = time.perf_counter()
    metrics.precision_recall(reference[:m_pr], samples[:n_pr])
    out["precision_recall_s"] = (time.perf_counter() - start) / pr_scale**2
    out["precision_recall_measured_on"] = [m_pr, n_pr]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precisions", default="highest,default")
    parser.add_argument("--num_samples", type=int, default=50000)
    parser.add_argument("--num_reference", type=int, default=10000)
    parser.add_argument("--pr_scale", type=float, default=1.0)
    parser.add_argument("--check", default=None)
    parser.add_argument("--write_check", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    device = jax.devices()[0]
    result = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
              "cpu": platform.processor() or platform.machine(), "batch": args.batch, "image_size": args.image_size}
    batch = np.random.default_rng(0).integers(0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
    if args.check:
        check_images = np.load(args.check, allow_pickle=False)["images"]
    else:  # the benchmark's image size: no second compilation
        check_images = np.random.default_rng(1).integers(0, 256, (8, args.image_size, args.image_size, 3), np.uint8)
    for precision in args.precisions.split(","):
        extractor = FeatureExtractor(args.weights, batch_size=args.batch, precision=precision)
        rate = time_features(extractor, batch, args.steps)
        result[f"features_per_s_{precision}"] = rate
        pool3 = extractor.features_of_array(check_images, progress=False).pool3
        if args.write_check and precision == "highest":
            np.savez(args.write_check, images=check_images, pool3=pool3)
        if args.check:
            expected = np.load(args.check, allow_pickle=False)["pool3"]
            result[f"rel_err_vs_check_{precision}"] = float(np.linalg.norm(pool3 - expected) / np.linalg.norm(expected))
        print(f"{precision}: {rate:,.0f} images/s ({args.batch} x {args.image_size}^2 uint8 -> 299^2)", flush=True)
    result.update(time_metrics(args.num_samples, args.num_reference, args.pr_scale))
    feature_rate = result["features_per_s_highest"]
    result["estimate_50k_s"] = ((args.num_samples + args.num_reference) / feature_rate + result["statistics_s"]
                                + result["fid_and_sfid_s"] + result["inception_score_s"] + result["precision_recall_s"])
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
