"""Orbax checkpoints of a workdir (WORKDIR/checkpoints): one manager helper for both trainers, the
main trainer's (train state, data iterator position) items, and its preemption flag.

Saves are atomic (a temporary directory renamed when complete), asynchronous if asked, the newest
`keep` kept, and refused when the state holds a non-finite value. Once a save has finished (at the
next save or at `finish_saves`), process 0 writes STEP/checksums.json (sha256 of every file); a
restore verifies it, and a damaged or unreadable checkpoint is moved to WORKDIR/damaged_checkpoints/
and the next older one tried, saying so. A restore places the train state by the given shardings
(Orbax reshards a checkpoint written on another mesh).
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
import weakref

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from lasadgen_jax.distributed import sync_processes
from lasadgen_jax.workdir import workdir_path

TRAIN_ITEMS = ("state", "data")   # the main trainer's: train state, grain iterator position
CHECKSUM_FILE = "checksums.json"
DAMAGED_DIRECTORY = "damaged_checkpoints"   # in the workdir, beside checkpoints/: out of Orbax's sight
_UNSUMMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # manager -> steps saved, not summed yet


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files are missing, altered or unreadable (not one of another model)."""


class IncompatibleCheckpointError(ValueError):
    """An intact checkpoint this run cannot continue (e.g. written by another number of processes)."""


# ----------------------------------------------------------------------------- saving


def checkpoint_manager(workdir: str, *, keep: int, every_steps: int = 1, async_save: bool = True,
                       item_names: tuple[str, ...] | None = None) -> ocp.CheckpointManager:
    """The Orbax manager of WORKDIR/checkpoints: a save every `every_steps` steps (unless forced), the
    newest `keep` kept, leftovers of interrupted saves removed."""
    options = ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(workdir_path(workdir, "checkpoints"), options=options, item_names=item_names)


def train_checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """The main trainer's manager, as config.checkpoint asks: items TRAIN_ITEMS."""
    return checkpoint_manager(workdir, keep=config.checkpoint.keep, every_steps=config.checkpoint.every_steps,
                              async_save=config.checkpoint.async_save, item_names=TRAIN_ITEMS)


def non_finite_leaves(state) -> list[str]:
    """The paths of the floating-point leaves of `state` holding a NaN/inf (one compiled check when none)."""
    from lasadgen_jax.train_state import jitted_all_finite

    if bool(jitted_all_finite(state)):
        return []
    return [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact) and not bool(jax.numpy.isfinite(leaf).all())]


def check_finite_state(state, step: int) -> None:
    """Refuse to save a train state with a NaN/inf leaf: it would replace good checkpoints by rotation."""
    bad = non_finite_leaves(state)
    if bad:
        raise FloatingPointError(f"refusing to save checkpoint {step}: non-finite values in {', '.join(bad[:4])}"
                                 f"{' ...' if len(bad) > 4 else ''}; the earlier checkpoints are kept")


def save_items(manager, step: int, args, state, force: bool = False) -> bool:
    """manager.save of `args` (the state checked finite first), after summing the earlier, finished saves."""
    if not (force or manager.should_save(step)):
        return False
    check_finite_state(state, step)
    finish_saves(manager)
    saved = manager.save(step, args=args, force=force)
    if saved:
        _UNSUMMED.setdefault(manager, []).append(step)
    return saved


def save_checkpoint(manager, step: int, state: dict, iterator, force: bool = False) -> bool:
    import grain  # grain (and its worker machinery) loads only in runs that read data

    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator))
    return save_items(manager, step, args, state, force=force)


def finish_saves(manager) -> None:
    """Wait for the in-flight save; then process 0 writes the checksums of every save this run made."""
    manager.wait_until_finished()
    steps = _UNSUMMED.pop(manager, [])
    if jax.process_index() != 0:
        return
    for step in steps:
        directory = epath.Path(manager.directory) / str(step)
        if directory.is_dir():   # else rotated away already
            sums = {name: digest for name, digest in file_digests(directory).items() if name != CHECKSUM_FILE}
            (directory / CHECKSUM_FILE).write_text(json.dumps({"sha256": sums}, indent=1, sort_keys=True))


def close_manager(manager) -> None:
    """Finish (and sum) the in-flight save, then close: also on the way out of an exception."""
    try:
        finish_saves(manager)
    finally:
        manager.close()


def file_digests(directory: epath.Path) -> dict[str, str]:
    """{path relative to directory: sha256 hex} of every file below it."""
    digests, folders = {}, [directory]
    while folders:   # epath has no recursive glob on gs://
        for path in sorted(folders.pop().iterdir()):
            if path.is_dir():
                folders.append(path)
            else:
                digest = hashlib.sha256()
                with path.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 24), b""):
                        digest.update(chunk)
                digests[str(path.relative_to(directory))] = digest.hexdigest()
    return dict(sorted(digests.items()))


# ----------------------------------------------------------------------------- restoring


def verify_checksums(directory: epath.Path, step: int) -> bool:
    """Raise DamagedCheckpointError when a file listed in STEP/checksums.json is missing or differs;
    False when the checkpoint has no checksums (interrupted before they were written), True when it matches."""
    listed = directory / CHECKSUM_FILE
    if not listed.is_file():
        return False
    expected = json.loads(listed.read_text())["sha256"]
    found = file_digests(directory)
    missing = sorted(set(expected) - set(found))
    differ = sorted(name for name in expected if name in found and found[name] != expected[name])
    if missing or differ:
        raise DamagedCheckpointError(f"checkpoint {step} at {directory} is damaged: "
                                     + "; ".join(filter(None, [missing and f"missing {', '.join(missing[:3])}",
                                                               differ and f"altered {', '.join(differ[:3])}"])))
    return True


def restore_newest_good(manager, restore_step) -> tuple[object, int] | None:
    """(restore_step(step), step) of the newest checkpoint that is intact and readable, newest first, or
    None when there is none. A damaged one (checksums differ, files missing, Orbax/TensorStore cannot read
    it) is reported in one line and moved to WORKDIR/damaged_checkpoints/; an intact checkpoint that does
    not fit the model raises. restore_step raises DamagedCheckpointError for what it finds damaged itself."""
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        directory = epath.Path(manager.directory) / str(step)
        try:
            result = read_checkpoint(step, directory, restore_step)
        except DamagedCheckpointError as error:
            damaged.append(step)
            move_damaged(manager, directory)
            if jax.process_index() == 0:
                print(f"warning: {error}; moved to {directory.parent.parent / DAMAGED_DIRECTORY}", file=sys.stderr,
                      flush=True)
            continue
        if damaged and jax.process_index() == 0:
            print(f"warning: resuming from checkpoint {step}, the newest intact one (damaged: {damaged})",
                  file=sys.stderr, flush=True)
        return result, step
    if damaged:
        raise ValueError(f"every checkpoint in {manager.directory} is damaged (steps {damaged}, moved to "
                         f"{epath.Path(manager.directory).parent / DAMAGED_DIRECTORY}); nothing to resume from. "
                         f"Restore a copy, or move metrics.jsonl aside to start again from step 0")
    return None


def read_checkpoint(step: int, directory: epath.Path, restore_step):
    """restore_step(step) after the checksums; what the reader raises on a checkpoint that is not known
    intact becomes DamagedCheckpointError, a ValueError on an intact one passes (another model)."""
    verified = verify_checksums(directory, step)
    try:
        result = restore_step(step)
    except (DamagedCheckpointError, IncompatibleCheckpointError):
        raise
    except Exception as error:   # noqa: BLE001 - whatever Orbax/TensorStore raised, named in one line
        if verified and isinstance(error, (ValueError, KeyError)):
            raise
        raise DamagedCheckpointError(f"checkpoint {step} at {directory} is unreadable: "
                                     f"{type(error).__name__}: {first_line(error)}") from None
    bad = non_finite_leaves(result)
    if bad:
        raise DamagedCheckpointError(f"checkpoint {step} at {directory} holds non-finite values in "
                                     f"{', '.join(bad[:4])}")
    return result


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines() or [""])[0][:300]


def move_damaged(manager, directory: epath.Path) -> None:
    """Move a damaged step out of checkpoints/, so that its step number can be saved again."""
    sync_processes(f"checkpoint {directory.name} found damaged")
    if jax.process_index() == 0:
        target = directory.parent.parent / DAMAGED_DIRECTORY
        target.mkdir(parents=True, exist_ok=True)
        destination = target / directory.name
        suffix = 1
        while destination.exists():
            destination, suffix = target / f"{directory.name}.{suffix}", suffix + 1
        directory.rename(destination)
    sync_processes(f"checkpoint {directory.name} moved aside")
    manager.reload()


def restore_checkpoint(manager, step: int, abstract_state: dict, state_shardings: dict, iterator) -> dict:
    """The train state of `step`, placed by state_shardings (Orbax reshards a checkpoint written on
    another mesh); the iterator is moved to the checkpoint's position in place."""
    import grain  # as in save_checkpoint

    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                          state_shardings)
    check_data_state_processes(epath.Path(manager.directory) / str(step) / "data", step)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 data=grain.checkpoint.CheckpointRestore(iterator)))
    except (ValueError, KeyError) as error:
        raise ValueError(f"checkpoint {manager.directory}/{step} does not fit this model and config: {error}") from None
    return restored["state"]


def restore_latest_train_state(manager, abstract_state: dict, state_shardings: dict, iterator):
    """(train state, step) of the newest intact checkpoint (restore_newest_good), or None."""
    return restore_newest_good(
        manager, lambda step: restore_checkpoint(manager, step, abstract_state, state_shardings, iterator))


def check_data_state_processes(data_directory: epath.Path, step: int) -> None:
    """Refuse (clearly) a checkpoint whose data iterator positions come from another number of processes.

    grain saves one position per process (process_I-of-N.json). Each process reads the records i with
    i % N == I, so a position means nothing to a run of another process count: the parameters would
    restore (Orbax reshards them onto any mesh), the data order cannot continue exactly.
    """
    index, count = jax.process_index(), jax.process_count()
    if not data_directory.is_dir():
        raise DamagedCheckpointError(f"checkpoint {step} at {data_directory.parent}: its data iterator "
                                     f"positions ({data_directory.name}/) are missing")
    if (data_directory / f"process_{index}-of-{count}.json").exists():
        return
    written = sorted(path.name for path in data_directory.glob("process_*-of-*.json"))
    if not written or any(name.endswith(f"-of-{count}.json") for name in written):   # this process' file gone
        raise DamagedCheckpointError(f"checkpoint {step} at {data_directory.parent}: the data iterator position "
                                     f"{data_directory.name}/process_{index}-of-{count}.json is missing")
    counts = sorted({name.rsplit("-of-", 1)[1].removesuffix(".json") for name in written})
    raise IncompatibleCheckpointError(
        f"checkpoint {step} in {data_directory.parent.parent}: its data iterator positions were saved "
        f"by {' or '.join(counts)} process(es) ({', '.join(written[:4])}), this run has {count}. "
        f"Each process reads its own slice of the records, so the run resumes exactly only with the "
        f"same number of processes (hosts); the mesh and device count may change.")


class PreemptionFlag:
    """Set by SIGTERM; the loop saves a checkpoint at the next step boundary and returns.

    Only in a run of one process. With several, each process would stop at whatever step its own
    signal found it, and the others would wait forever in that step's collectives; there the signal is
    left to JAX's preemption service (started by jax.distributed.initialize), which agrees on one
    step for all processes: `manager.reached_preemption(step)`.
    """

    def __init__(self, install: bool = True):
        self.raised = False
        self.previous = None
        self.install = install

    def __enter__(self):
        # Signals reach the main thread only.
        if self.install and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
