"""The grain input pipeline over token shards: what the AR trainer reads.

    dataset = token_dataset(directory, grid=(16, 16), codebook_size=16384, batch_size=256, seed=0)
    iterator = token_iterator(dataset, num_workers=2)
    batch = next(iterator)    # {"tokens": int32 [256, 256], "label": int32 [256]}
    state = iterator.get_state()   # save it with the model checkpoint; iterator.set_state(state) resumes

Order of the MapDataset: record indices of every shard -> this host's slice (records i with
i % shard_count == shard_index: disjoint across hosts, together all of them) -> seeded shuffle ->
repeat (reshuffled each epoch) -> batches of indices -> one bulk read and decode per batch, which
checks the codes and picks one crop per record by a hash of (seed, position in the repeated
stream): a fresh choice every epoch. Everything is a function of (seed, position), so the iterator
state is just a position and restoring it resumes at exactly the next batch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time

import grain
import jax
import numpy as np

from lasadgen_jax.data import manifest as manifests
from lasadgen_jax.data.records import decode_record, decode_records

logger = logging.getLogger(__name__)


def pick_crops(seed: int, positions: np.ndarray, num_crops: int) -> np.ndarray:
    """A crop index per stream position: splitmix64 of (seed, position), vectorised.

    Why a hash and not grain's random_map: that builds a numpy Generator per record (~35 us), more
    than everything else a record costs; a hash of the position is as reproducible and ~free.
    """
    seed_mix = np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)   # Python ints: no uint64 overflow warning
    z = positions.astype(np.uint64) + seed_mix
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) % np.uint64(num_crops)).astype(np.intp)


class ReadAndDecodeBatch(grain.transforms.MapWithIndex):
    """(batch number, record indices [B]) -> {"tokens": int32 [B, h*w] (one crop each), "label": int32 [B]}.

    Reads the batch's records in one bulk ArrayRecord call and decodes them in one np.frombuffer:
    per-record Python work in grain costs more than the read itself. Every crop of every record is
    checked against the codebook, not only the one picked. The shards are opened lazily, so that
    multiprocess prefetch pickles paths, not open readers, to its workers.

    A batch that fails to read or decode is read again record by record, to name the shard and the
    record that fail. With skip_corrupt_records, such a record is skipped instead: its place in the
    batch goes to the next good record of the same batch (batches keep their size, and the stream
    stays a function of the position), and every skip is logged with the count so far in this
    process (each prefetch worker counts its own).
    """

    def __init__(self, paths: list[str], record_counts: list[int], num_crops: int, num_tokens: int,
                 codebook_size: int, batch_size: int, seed: int, skip_corrupt_records: bool = False):
        if len(paths) != len(record_counts):
            raise ValueError(f"{len(paths)} shard paths but {len(record_counts)} record counts")
        self.paths, self.num_crops, self.num_tokens = paths, num_crops, num_tokens
        self.shard_starts = np.cumsum([0, *record_counts])   # the data's index of each shard's first record
        self.codebook_size, self.batch_size, self.seed = codebook_size, batch_size, seed
        self.skip_corrupt_records = skip_corrupt_records
        self.corrupt_records = 0
        self.source = None
        self.count_lock = threading.Lock()

    def __getstate__(self):
        return {**self.__dict__, "source": None, "count_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, count_lock=threading.Lock())

    def describe(self, index: int) -> str:
        """'token shard PATH record i' of a record index of the whole data."""
        shard = int(np.searchsorted(self.shard_starts, index, side="right")) - 1
        return f"token shard {self.paths[shard]} record {index - self.shard_starts[shard]}"

    def map_with_index(self, batch_number: int, record_indices: np.ndarray) -> dict:
        if self.source is None:
            self.source = grain.sources.ArrayRecordDataSource(self.paths)
        try:
            codes, labels = decode_records(self.source.__getitems__(record_indices.tolist()), self.num_crops,
                                           self.num_tokens)
        except (RuntimeError, OSError, ValueError):   # Riegeli reports corruption as RuntimeError
            codes, labels = decode_records(self.read_one_by_one(record_indices), self.num_crops, self.num_tokens)
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.codebook_size:
            bad = int(np.argmax((codes < 0).any(axis=(1, 2)) | (codes >= self.codebook_size).any(axis=(1, 2))))
            raise ValueError(f"{self.describe(record_indices[bad])} (label {labels[bad]}) holds codes in "
                             f"[{low}, {high}], outside the codebook [0, {self.codebook_size})")
        positions = batch_number * self.batch_size + np.arange(len(record_indices))
        crops = pick_crops(self.seed, positions, self.num_crops)
        return {"tokens": codes[np.arange(len(record_indices)), crops].astype(np.int32), "label": labels}

    def read_one_by_one(self, record_indices: np.ndarray) -> list[bytes]:
        """The batch's records read and checked one at a time: a ValueError naming the first that fails,
        or, with skip_corrupt_records, each failing one replaced by the next good one (cyclically)."""
        good = {}
        for position, index in enumerate(record_indices.tolist()):
            try:
                record = self.source[index]
                codes, _ = decode_record(record)
                if codes.shape != (self.num_crops, self.num_tokens):
                    raise ValueError(f"{codes.shape[0]} crops x {codes.shape[1]} tokens, the manifest says "
                                     f"{self.num_crops} x {self.num_tokens}")
                good[position] = record
            except (RuntimeError, OSError, ValueError) as error:
                if not self.skip_corrupt_records:
                    raise ValueError(f"{self.describe(index)} cannot be read: {error}") from error
                self.count_corrupt(index, error)
        if not good:
            raise ValueError(f"every record of a batch is corrupt, e.g. {self.describe(record_indices[0])}")
        replacement = lambda position: min((p for p in good if p > position), default=min(good))
        return [good[p] if p in good else good[replacement(p)] for p in range(len(record_indices))]

    def count_corrupt(self, index: int, error: Exception) -> None:
        with self.count_lock:
            self.corrupt_records += 1
            count = self.corrupt_records
        logger.warning("skipped corrupt %s (%s); %d corrupt token record(s) skipped so far in process %d",
                       self.describe(index), error, count, os.getpid())


def token_dataset(directory: str, *, grid: tuple[int, int], codebook_size: int, batch_size: int, seed: int,
                  shard_index: int | None = None, shard_count: int | None = None,
                  num_epochs: int | None = None, drop_remainder: bool = True,
                  skip_corrupt_records: bool = False) -> grain.MapDataset:
    """The batched MapDataset of a token directory for this host (defaults: jax.process_index/count).

    Refuses (ValueError) a directory whose manifest disagrees with `grid` or `codebook_size`, or with
    the number of records in any shard file. num_epochs=None repeats forever. A record that cannot be
    read or decoded is a ValueError naming its shard and index, or, with skip_corrupt_records, is
    skipped, logged and counted (see ReadAndDecodeBatch).
    """
    manifest = manifests.read_manifest(directory)
    manifests.check_manifest_matches(manifest, os.path.join(directory, manifests.MANIFEST_FILE), grid, codebook_size)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    counts = manifests.check_shard_record_counts(directory, manifest)
    shards = [(os.path.join(directory, shard["file"]), count) for shard, count in zip(manifest["shards"], counts)
              if count > 0]
    if not shards:
        raise ValueError(f"{directory!r}: the manifest lists no records")
    spec = manifest["spec"]
    num_records = sum(counts)
    indices = grain.MapDataset.range(num_records)[shard_index::shard_count]
    if len(indices) < batch_size and drop_remainder:
        raise ValueError(f"host shard {shard_index}/{shard_count} of {directory!r} has {len(indices)} records, "
                         f"fewer than one batch of {batch_size}")
    indices = indices.shuffle(seed=seed).repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder)
    paths, record_counts = [path for path, _ in shards], [count for _, count in shards]
    return indices.map_with_index(ReadAndDecodeBatch(paths, record_counts, spec["num_crops"], grid[0] * grid[1],
                                                     codebook_size, batch_size, seed, skip_corrupt_records))


def mark_absl_flags_parsed() -> None:
    """grain's multiprocess prefetch reads absl flags, which raises outside an absl app (pytest, a
    plain script) because nothing parsed them. Marking them parsed keeps every default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


PARENT_DIED_EXIT_CODE = 70


def exit_when_parent_dies(worker_index: int, worker_count: int) -> None:
    """grain worker_init_fn: a daemon thread that ends this prefetch worker as soon as its parent is gone.

    Without it a worker whose trainer was SIGKILLed (preemption, OOM killer) blocks forever on its
    full output queue. The thread waits on the sentinel of multiprocessing's parent_process (a pipe
    that closes when the parent exits, however it exits). Not prctl(PR_SET_PDEATHSIG): that fires
    when the *thread* that started the worker exits, and grain starts workers from pool threads.
    """
    del worker_index, worker_count
    parent = multiprocessing.parent_process()
    threading.Thread(target=wait_for_parent_then_exit, args=(parent,), name="exit-when-parent-dies",
                     daemon=True).start()


def wait_for_parent_then_exit(parent) -> None:
    if parent is not None:   # grain starts workers with "spawn": the parent's sentinel is known
        parent.join()
    else:                    # otherwise: reparenting changes the parent process id
        original = os.getppid()
        while os.getppid() == original:
            time.sleep(0.5)
    os._exit(PARENT_DIED_EXIT_CODE)


def token_iterator(dataset: grain.MapDataset, *, num_workers: int = 0, read_threads: int = 1,
                   prefetch_batches: int = 4, per_worker_buffer_size: int = 1):
    """A checkpointable iterator (get_state / set_state) over the batched dataset.

    read_threads threads keep prefetch_batches batches ready (in each worker, with workers); grain's
    default buffer of 500 elements would mean 500 *batches* here. num_workers > 0 adds
    multiprocess prefetch, whose workers exit when this process dies (exit_when_parent_dies).
    """
    if num_workers < 0 or read_threads < 0 or prefetch_batches < 0:
        raise ValueError(f"num_workers, read_threads and prefetch_batches must be >= 0, got "
                         f"{num_workers}, {read_threads}, {prefetch_batches}")
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    iter_dataset = dataset.to_iter_dataset(read_options)
    if num_workers:
        mark_absl_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=per_worker_buffer_size),
            worker_init_fn=exit_when_parent_dies)
    return iter(iter_dataset)
