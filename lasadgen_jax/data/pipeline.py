"""The grain input pipeline over token shards: what the AR trainer reads.

    dataset = token_dataset(directory, grid=(16, 16), codebook_size=16384, batch_size=256, seed=0)
    iterator = token_iterator(dataset, num_workers=2)
    batch = next(iterator)    # {"tokens": int32 [256, 256], "label": int32 [256]}
    state = iterator.get_state()   # save it with the model checkpoint; iterator.set_state(state) resumes

Order of the MapDataset: records of every shard -> this host's slice (records i with
i % shard_count == shard_index: disjoint across hosts, together all of them) -> seeded shuffle ->
repeat (reshuffled each epoch) -> decode, check and pick one crop at random (a fresh choice every
epoch, since the choice is seeded by the position in the repeated stream) -> batch. Everything is a
function of (seed, position), so the iterator state is just a position and restoring it resumes at
exactly the next batch.
"""

from __future__ import annotations

import os

import grain
import jax
import numpy as np

from lasadgen_jax.data import manifest as manifests
from lasadgen_jax.data.records import decode_record


class DecodeAndPickCrop(grain.transforms.RandomMap):
    """record bytes -> {"tokens": int32 [h*w] (one crop, chosen at random), "label": int32}.

    A module-level class (not a closure) so that multiprocess prefetch can send it to its workers.
    """

    def __init__(self, num_crops: int, num_tokens: int, codebook_size: int):
        self.num_crops, self.num_tokens, self.codebook_size = num_crops, num_tokens, codebook_size

    def random_map(self, record: bytes, rng: np.random.Generator) -> dict:
        codes, label = decode_record(record)
        if codes.shape != (self.num_crops, self.num_tokens):
            raise ValueError(f"token record holds codes {codes.shape}, the manifest promises "
                             f"({self.num_crops}, {self.num_tokens})")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"token record (label {label}) holds codes in [{codes.min()}, {codes.max()}], "
                             f"outside the codebook [0, {self.codebook_size})")
        crop = rng.integers(self.num_crops)
        return {"tokens": codes[crop], "label": np.int32(label)}


def token_dataset(directory: str, *, grid: tuple[int, int], codebook_size: int, batch_size: int, seed: int,
                  shard_index: int | None = None, shard_count: int | None = None,
                  num_epochs: int | None = None, drop_remainder: bool = True) -> grain.MapDataset:
    """The batched MapDataset of a token directory for this host (defaults: jax.process_index/count).

    Refuses (ValueError) a directory whose manifest disagrees with `grid` or `codebook_size`.
    num_epochs=None repeats forever.
    """
    manifest = manifests.read_manifest(directory)
    manifests.check_manifest_matches(manifest, os.path.join(directory, manifests.MANIFEST_FILE), grid, codebook_size)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    paths = [os.path.join(directory, shard["file"]) for shard in manifest["shards"] if shard["records"] > 0]
    if not paths:
        raise ValueError(f"{directory!r}: the manifest lists no records")
    spec = manifest["spec"]
    dataset = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
    dataset = dataset[shard_index::shard_count]
    if len(dataset) < batch_size and drop_remainder:
        raise ValueError(f"host shard {shard_index}/{shard_count} of {directory!r} has {len(dataset)} records, "
                         f"fewer than one batch of {batch_size}")
    dataset = dataset.shuffle(seed=seed).repeat(num_epochs)
    dataset = dataset.random_map(DecodeAndPickCrop(spec["num_crops"], grid[0] * grid[1], codebook_size), seed=seed)
    return dataset.batch(batch_size, drop_remainder=drop_remainder)


def mark_absl_flags_parsed() -> None:
    """grain's multiprocess prefetch reads absl flags, which raises outside an absl app (pytest, a
    plain script) because nothing parsed them. Marking them parsed keeps every default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def token_iterator(dataset: grain.MapDataset, *, num_workers: int = 0, per_worker_buffer_size: int = 1):
    """A checkpointable iterator (get_state / set_state); num_workers > 0 adds multiprocess prefetch."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    iter_dataset = dataset.to_iter_dataset()
    if num_workers:
        mark_absl_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=per_worker_buffer_size))
    return iter(iter_dataset)
