"""Benchmark token extraction (small VQ, CPU) and the grain pipeline (0 and N workers).

    python3 benchmarks/data_pipeline.py [--extract-images 2000] [--records 20000] [--workers 0,2]

Extraction: `lasadgen_jax.data.extract.extract` on the first --extract-images Fashion-MNIST train
images (up to 12000 from the subset in the package; more need the full dataset) with the small VQ of configs/vq_small.py
(random weights: speed does not depend on them), 32x32, `flip` crops; images/s over the whole
call, twice: the first run includes loading and compiling, the second (into a fresh directory)
reuses the compiled encoder; baseline: the compiled encoder alone on ready crops. Pipeline: synthetic
shards shaped like ImageNet through VQ-16 (10 crops x 256 codes of 16384, int16), batches of
--batch-size from `token_iterator`, after one warm-up batch; baseline: bulk ArrayRecord reads of the
same number of random records, nothing decoded.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

import grain
import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from lasadgen_jax.config_files import load_config
from lasadgen_jax.data import extract, records
from lasadgen_jax.data import manifest as manifests
from lasadgen_jax.data.pipeline import token_dataset, token_iterator
from lasadgen_jax.data.sharded_encoder import ShardedEncoder
from lasadgen_jax.tokenizer import VQArchitecture, load_tokenizer, save_tokenizer
from lasadgen_jax.tokenizer.model import create_vq_model

CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs", "vq_small.py")


def small_vq_architecture() -> VQArchitecture:
    return VQArchitecture.from_dict(dict(load_config(CONFIG_FILE).model))


def benchmark_extraction(workdir: str, num_images: int, batch_size: int, workers: int) -> dict:
    arch = small_vq_architecture()
    tokenizer = os.path.join(workdir, "tokenizer")
    save_tokenizer(create_vq_model(arch, seed=0), tokenizer)
    timings = []
    for attempt in range(2):   # the first run compiles; the second reuses the compiled encoder
        started = time.perf_counter()
        summary = extract.extract(tokenizer, "fashion_mnist", os.path.join(workdir, f"tokens{attempt}"),
                                  image_size=32, crops="flip", shard_size=1000, batch_size=batch_size,
                                  workers=workers, max_images=num_images)
        timings.append(time.perf_counter() - started)
    return {"arch": arch, "images": num_images, "records": summary["manifest"]["num_records"],
            "grid": summary["manifest"]["spec"]["grid"], "first_run_images_per_s": num_images / timings[0],
            "warm_images_per_s": num_images / timings[1],
            "encoder_only_images_per_s": encoder_only_rate(tokenizer, num_images, batch_size)}


def encoder_only_rate(tokenizer: str, num_images: int, batch_size: int) -> float:
    """Baseline: images/s of the compiled encoder alone on already-cropped images (2 crops each)."""
    encoder = ShardedEncoder(load_tokenizer(tokenizer), 2 * batch_size)
    crops = np.zeros((2 * batch_size, 32, 32, 3), np.uint8)
    encoder(crops)
    started = time.perf_counter()
    for _ in range(num_images // batch_size):
        encoder(crops)
    return (num_images // batch_size) * batch_size / (time.perf_counter() - started)


def write_synthetic_tokens(directory: str, num_records: int, num_crops: int, grid: tuple[int, int],
                           codebook_size: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    ranges = extract.shard_ranges(num_records, shard_size)
    code_bytes = records.code_bytes_for(codebook_size)
    spec = {"tokenizer_hash": "synthetic", "grid": list(grid), "codebook_size": codebook_size,
            "code_bytes": code_bytes, "crops": "tencrop", "num_crops": num_crops, "image_size": 256,
            "source": "synthetic", "num_images": num_records, "num_classes": 1000, "shard_size": shard_size}
    for index, (start, stop) in enumerate(ranges):
        path = os.path.join(directory, manifests.shard_name(index, len(ranges)))
        writer = ArrayRecordWriter(path, "group_size:1")
        for _ in range(start, stop):
            codes = rng.integers(0, codebook_size, (num_crops, grid[0] * grid[1]))
            writer.write(records.encode_record(codes, int(rng.integers(1000)), code_bytes))
        writer.close()
        manifests.write_json_atomically(manifests.sidecar_path(path), {
            "spec": spec, "file": os.path.basename(path), "records": stop - start, "skipped": 0})
    extract.write_manifest_if_complete(directory, spec, len(ranges))


def raw_read_rate(directory: str, batch_size: int, batches: int) -> float:
    """Baseline: records/s of bulk ArrayRecord reads of random index batches, nothing decoded."""
    manifest = manifests.read_manifest(directory)
    source = grain.sources.ArrayRecordDataSource([os.path.join(directory, s["file"]) for s in manifest["shards"]])
    rng = np.random.default_rng(0)
    index_batches = [rng.integers(0, len(source), batch_size).tolist() for _ in range(batches + 1)]
    source.__getitems__(index_batches[0])
    started = time.perf_counter()
    for indices in index_batches[1:]:
        source.__getitems__(indices)
    return batches * batch_size / (time.perf_counter() - started)


def benchmark_pipeline(directory: str, grid, codebook_size: int, batch_size: int, workers: int, batches: int) -> dict:
    dataset = token_dataset(directory, grid=grid, codebook_size=codebook_size, batch_size=batch_size, seed=0,
                            shard_index=0, shard_count=1)
    iterator = token_iterator(dataset, num_workers=workers)
    next(iterator)   # warm-up: worker start-up, first reads
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - started
    assert batch["tokens"].shape == (batch_size, grid[0] * grid[1])
    return {"workers": workers, "batches_per_s": batches / seconds, "records_per_s": batches * batch_size / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extract-images", type=int, default=2000)
    parser.add_argument("--extract-batch-size", type=int, default=64)
    parser.add_argument("--extract-workers", type=int, default=2)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", default="0,2")
    args = parser.parse_args()

    print(f"date {datetime.date.today()}, jax {jax.__version__}, devices {jax.devices()}, "
          f"python {platform.python_version()}, cpus {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as workdir:
        result = benchmark_extraction(workdir, args.extract_images, args.extract_batch_size, args.extract_workers)
        arch = result["arch"]
        print(f"\nextraction: {result['images']} Fashion-MNIST images 32x32, flip (2 crops), grid {result['grid']}, "
              f"VQ base {arch.base_channels} x {list(arch.channel_multipliers)}, codebook {arch.codebook_size}, "
              f"encoder batch {args.extract_batch_size} images ({2 * args.extract_batch_size} crops)")
        base = result["encoder_only_images_per_s"]
        print("| run | images/s | crops encoded/s | x encoder alone |\n|---|---|---|---|")
        print(f"| encoder alone (baseline) | {base:.0f} | {2 * base:.0f} | 1 |")
        rows = [("extract, first run (compiles)", "first_run_images_per_s"),
                ("extract, second run", "warm_images_per_s")]
        for name, key in rows:
            print(f"| {name} | {result[key]:.0f} | {2 * result[key]:.0f} | {result[key] / base:.2f} |")

        tokens = os.path.join(workdir, "synthetic")
        os.makedirs(tokens)
        grid, codebook_size = (16, 16), 16384
        write_synthetic_tokens(tokens, args.records, 10, grid, codebook_size, shard_size=5000)
        print(f"\npipeline: {args.records} records of int16 codes [10, 256] (VQ-16 ImageNet shape), "
              f"batch {args.batch_size}, {args.batches} batches after one warm-up")
        raw = raw_read_rate(tokens, args.batch_size, args.batches)
        print("| workers | batches/s | token-records/s | x raw bulk read |\n|---|---|---|---|")
        print(f"| raw bulk read (baseline) | {raw / args.batch_size:.1f} | {raw:.0f} | 1 |")
        for workers in [int(w) for w in args.workers.split(",")]:
            row = benchmark_pipeline(tokens, grid, codebook_size, args.batch_size, workers, args.batches)
            print(f"| {row['workers']} | {row['batches_per_s']:.1f} | {row['records_per_s']:.0f} "
                  f"| {row['records_per_s'] / raw:.2f} |")


if __name__ == "__main__":
    main()
