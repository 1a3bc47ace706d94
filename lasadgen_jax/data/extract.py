"""Encode a dataset into ArrayRecord shards of VQ codes (LlamaGen's extraction recipe).

    python -m lasadgen_jax.data.extract --tokenizer=TOKENIZER_DIR \\
        --source=imagefolder:DIR | tfds:imagenet2012 | fashion_mnist \\
        --crops=tencrop|flip --out=OUT_DIR [--image_size=256]

--image_size defaults to the size the tokenizer was trained at (its tokenizer.json); another size is
refused unless --allow_other_image_size (e.g. LlamaGen's 256 px VQ on 384 px crops).
The images [0, N) are cut into shards of --shard_size; process p of P (jax.process_index /
process_count, or --process_index / --process_count) writes the shards k with k % P == p, so hosts
never share a shard. Run it on every host (`--distributed`, as the trainer: jax.distributed.initialize
from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, SLURM, Open MPI or a Cloud TPU VM),
or give each host --process_index and --process_count. A shard is written to a temporary file and
renamed, then its sidecar JSON (spec + counts) is renamed into place: a shard with a sidecar is
finished and a re-run skips it.
Images that cannot be decoded are skipped and counted, never fatal. When every shard is finished,
`manifest.json` lists them (see lasadgen_jax.data.manifest; records: lasadgen_jax.data.records).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import json
import os
import sys

import jax
import numpy as np
from tqdm import tqdm

from lasadgen_jax.data import crops as crop_recipes
from lasadgen_jax.data import manifest as manifests
from lasadgen_jax.data.records import code_bytes_for, encode_record
from lasadgen_jax.data.sharded_encoder import ShardedEncoder
from lasadgen_jax.data.sources import open_source
from lasadgen_jax.distributed import initialize_from_environment
from lasadgen_jax.tokenizer.checkpoint import load_tokenizer, tokenizer_hash, trained_image_size

MAX_LISTED_SKIPS = 20  # per shard, in its sidecar; the count is always complete


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    if shard_size <= 0:
        raise ValueError(f"--shard_size must be positive, got {shard_size}")
    return [(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]


def shards_of_process(num_shards: int, process_index: int, process_count: int) -> list[int]:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} is not in [0, {process_count})")
    return list(range(process_index, num_shards, process_count))


def load_crops(source, index: int, image_size: int, mode: str):
    """(crops uint8 [C, S, S, 3] or None if the image is unreadable, label) of one source image."""
    image, label = source.load(index)
    if image is None:
        return None, label
    return crop_recipes.make_crops(image, image_size, mode), label


def check_existing_sidecar(path: str, spec: dict) -> dict | None:
    """The sidecar of a finished shard (None if unfinished); refuses one made by another recipe."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        sidecar = json.load(f)
    if sidecar["spec"] != spec:
        raise ValueError(f"--out holds shards of another extraction: {path} was made with {sidecar['spec']}, "
                         f"this run is {spec}; use a fresh --out")
    return sidecar


def remove_stale_temporaries(shard_path: str) -> None:
    """Temporary files of this shard and its sidecar left by a run that was killed (SIGKILL, power loss):
    nothing else writes them, since every shard has one owning process."""
    for path in (shard_path, manifests.sidecar_path(shard_path)):
        for stale in glob.glob(glob.escape(path) + ".tmp-*"):
            os.remove(stale)


def write_shard(shard_path, image_range, source, encoder, spec, batch_size, pool, progress) -> dict:
    """Encode one shard's images into shard_path (atomically) and return its sidecar.

    The shard is written to a temporary file renamed into place at the end; whatever stops the
    writing (an exception of the encoder or of an image, KeyboardInterrupt) removes it."""
    from array_record.python.array_record_module import ArrayRecordWriter

    num_crops, image_size, mode = spec["num_crops"], spec["image_size"], spec["crops"]
    remove_stale_temporaries(shard_path)
    temporary = f"{shard_path}.tmp-{os.getpid()}"
    records, skipped = 0, []
    batches = [range(s, min(s + batch_size, image_range[1]))
               for s in range(image_range[0], image_range[1], batch_size)]
    submit = lambda batch: [pool.submit(load_crops, source, i, image_size, mode) for i in batch]
    pending, writer = [], None
    try:
        writer = ArrayRecordWriter(temporary, "group_size:1")
        pending = submit(batches[0]) if batches else []
        for number, batch in enumerate(batches):
            loaded = [future.result() for future in pending]
            if number + 1 < len(batches):
                pending = submit(batches[number + 1])  # decode the next batch while this one encodes
            valid = [(item, label) for item, (item_crops, label) in zip(batch, loaded) if item_crops is not None]
            skipped += [source.describe(item) for item, (item_crops, _) in zip(batch, loaded) if item_crops is None]
            if valid:
                images = np.concatenate([loaded[item - batch.start][0] for item, _ in valid])
                codes = encoder(images).reshape(len(valid), num_crops, -1)
                for (_, label), item_codes in zip(valid, codes):
                    writer.write(encode_record(item_codes, label, spec["code_bytes"]))
                records += len(valid)
            progress.update(len(batch))
        writer.close()
        writer = None
        os.replace(temporary, shard_path)
    finally:
        for future in pending:
            future.cancel()
        if writer is not None:   # release the file before removing it; the error that got here is the one to see
            with contextlib.suppress(RuntimeError, OSError):
                writer.close()
        if os.path.exists(temporary):
            os.remove(temporary)
    if skipped:
        tqdm.write(f"{os.path.basename(shard_path)}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")
    return {"spec": spec, "file": os.path.basename(shard_path), "records": records,
            "skipped": len(skipped), "skipped_examples": skipped[:MAX_LISTED_SKIPS]}


def write_manifest_if_complete(out: str, spec: dict, num_shards: int) -> dict | None:
    """Write manifest.json from every shard's sidecar; None (and nothing written) while any is missing."""
    sidecars = []
    for index in range(num_shards):
        shard_path = os.path.join(out, manifests.shard_name(index, num_shards))
        sidecar = check_existing_sidecar(manifests.sidecar_path(shard_path), spec)
        if sidecar is None:
            return None
        sidecars.append(sidecar)
    manifest = {"format": manifests.FORMAT, "spec": spec,
                "record_layout": "lasadgen_jax.data.records v1: 20-byte LTOK header, codes [crops, h*w] "
                                 "little-endian, int32 label",
                "shards": [{key: s[key] for key in ("file", "records", "skipped")} for s in sidecars],
                "num_records": sum(s["records"] for s in sidecars), "num_skipped": sum(s["skipped"] for s in sidecars)}
    manifests.write_json_atomically(os.path.join(out, manifests.MANIFEST_FILE), manifest)
    return manifest


def resolve_image_size(tokenizer: str, image_size: int | None, allow_other: bool) -> int:
    """The crop size: by default the one the tokenizer was trained at (tokenizer.json); another is refused
    unless `allow_other` (a VQ trained at 32 px run on 256 px crops upsamples 8x, and grows shards 64x)."""
    trained = trained_image_size(tokenizer)
    if image_size is None:
        if trained is None:
            raise ValueError(f"--image_size: the tokenizer {tokenizer} does not record the image size it was "
                             f"trained at; give --image_size=N")
        return trained
    if trained is not None and image_size != trained and not allow_other:
        raise ValueError(f"--image_size={image_size}, but the tokenizer {tokenizer} was trained at {trained} px; "
                         f"leave --image_size out, or pass --allow_other_image_size to encode {image_size} px crops")
    return image_size


def check_output_directory(out: str) -> None:
    """Refuses an --out that is a file, then creates it: before the tokenizer and the source are read."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a directory; choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out} cannot be created: {error}") from None


def extract(tokenizer: str, source: str, out: str, *, split: str = "train", image_size: int | None = None,
            allow_other_image_size: bool = False,
            crops: str = "tencrop", shard_size: int = 10000, batch_size: int = 64, workers: int = 8,
            process_index: int | None = None, process_count: int | None = None,
            tfds_data_dir: str | None = None, max_images: int | None = None,
            skip_empty_classes: bool = False, fashion_mnist_root: str | None = None) -> dict:
    """Run (or resume) an extraction; returns a summary of what this process did.

    image_size: the crop side; None: the tokenizer's training size (see resolve_image_size).
    max_images: extract only the source's first max_images images (a quick look or a benchmark).
    skip_empty_classes: leave out class directories of an imagefolder source that hold no images
    (by default they are refused; see sources.ImageFolderSource).
    fashion_mnist_root: where the fashion_mnist source reads from (None: the default locations, see
    lasadgen_jax.data.fashion_mnist); it reads the first max_images, refusing more than the data hold.
    """
    crop_recipes.check_crop_mode(crops)
    if max_images is not None and max_images <= 0:
        raise ValueError(f"--max_images must be positive, got {max_images}")
    image_size = resolve_image_size(tokenizer, image_size, allow_other_image_size)
    model = load_tokenizer(tokenizer)
    grid = model.arch.grid(image_size)
    check_output_directory(out)
    image_source = open_source(source, split, tfds_data_dir, skip_empty_classes, fashion_mnist_root, max_images)
    num_images = len(image_source) if max_images is None else min(len(image_source), max_images)
    spec = {"tokenizer_hash": tokenizer_hash(tokenizer), "grid": list(grid),
            "codebook_size": model.arch.codebook_size, "code_bytes": code_bytes_for(model.arch.codebook_size),
            "crops": crops, "num_crops": crop_recipes.NUM_CROPS[crops], "image_size": image_size,
            "source": image_source.name,
            "num_images": num_images, "num_classes": image_source.num_classes, "shard_size": shard_size}
    multihost = process_index is None and jax.process_count() > 1
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count

    ranges = shard_ranges(num_images, shard_size)
    mine = shards_of_process(len(ranges), process_index, process_count)
    shard_paths = {k: os.path.join(out, manifests.shard_name(k, len(ranges))) for k in mine}
    todo = [k for k in mine if check_existing_sidecar(manifests.sidecar_path(shard_paths[k]), spec) is None]
    encoder = ShardedEncoder(model, batch_size * spec["num_crops"])
    progress = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in todo), unit="img", desc="extract",
                    file=sys.stderr, smoothing=0.1)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for k in todo:
            sidecar = write_shard(shard_paths[k], ranges[k], image_source, encoder, spec, batch_size, pool, progress)
            manifests.write_json_atomically(manifests.sidecar_path(shard_paths[k]), sidecar)
    progress.close()

    if multihost:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lasadgen_jax.data.extract: shards written")
    manifest = None
    if not multihost or process_index == 0:
        manifest = write_manifest_if_complete(out, spec, len(ranges))
    return {"written": todo, "skipped_finished": sorted(set(mine) - set(todo)), "num_shards": len(ranges),
            "manifest": manifest, "images_per_second": progress.format_dict["rate"]}


def main(argv) -> None:
    from absl import flags

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    if (FLAGS.process_index is None) != (FLAGS.process_count is None):
        raise ValueError("--process_index and --process_count go together")
    if FLAGS.process_index is None:   # several hosts, each told its place by jax.distributed
        initialize_from_environment(FLAGS.distributed)
    summary = extract(FLAGS.tokenizer, FLAGS.source, FLAGS.out, split=FLAGS.split, image_size=FLAGS.image_size,
                      allow_other_image_size=FLAGS.allow_other_image_size, crops=FLAGS.crops,
                      shard_size=FLAGS.shard_size, batch_size=FLAGS.batch_size, workers=FLAGS.workers,
                      process_index=FLAGS.process_index, process_count=FLAGS.process_count,
                      tfds_data_dir=FLAGS.tfds_data_dir, max_images=FLAGS.max_images,
                      skip_empty_classes=FLAGS.skip_empty_classes, fashion_mnist_root=FLAGS.fashion_mnist_root)
    manifest = summary["manifest"]
    print(f"wrote {len(summary['written'])} shard(s), skipped {len(summary['skipped_finished'])} finished; "
          + (f"manifest: {manifest['num_records']} records, {manifest['num_skipped']} unreadable images skipped"
             if manifest else "manifest not written yet (shards of other processes missing)"))


def define_flags():
    from absl import flags

    flags.DEFINE_string("tokenizer", None, "Tokenizer directory (tokenizer.convert or tokenizer.train output).")
    flags.DEFINE_string("source", None, "imagefolder:DIR | tfds:NAME | fashion_mnist")
    flags.DEFINE_string("split", "train", "Split of tfds and fashion_mnist sources.")
    flags.DEFINE_integer("image_size", None, "Crop side in pixels (default: the size the tokenizer was trained at, "
                         "from its tokenizer.json).")
    flags.DEFINE_bool("allow_other_image_size", False, "Accept an --image_size other than the tokenizer's training "
                      "size.")
    flags.DEFINE_enum("crops", "tencrop", list(crop_recipes.NUM_CROPS), "Crops per image.")
    flags.DEFINE_string("out", None, "Output directory of the shards and manifest.json.")
    flags.DEFINE_integer("shard_size", 10000, "Images per shard.")
    flags.DEFINE_integer("batch_size", 64, "Images per encoder call (x crops).")
    flags.DEFINE_integer("workers", 8, "Threads decoding and cropping images.")
    flags.DEFINE_integer("process_index", None, "This process's index (default: jax.process_index()).")
    flags.DEFINE_integer("process_count", None, "Number of processes (default: jax.process_count()).")
    flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"], "jax.distributed.initialize (as "
                      "config.distributed.initialize of the trainer); unused with --process_index.")
    flags.DEFINE_string("tfds_data_dir", None, "data_dir of tfds sources.")
    flags.DEFINE_integer("max_images", None, "Only the source's first N images.")
    flags.DEFINE_string("fashion_mnist_root", None, "fashion_mnist: directory of its four IDX .gz files (default: "
                        "$LASADGEN_FASHION_MNIST, Debian's package, else the subset in the package).")
    flags.DEFINE_bool("skip_empty_classes", False, "imagefolder: leave out class directories without images "
                      "(default: refuse them).")
    flags.mark_flags_as_required(["tokenizer", "source", "out"])


if __name__ == "__main__":
    from lasadgen_jax import cli

    define_flags()
    cli.run(main)
