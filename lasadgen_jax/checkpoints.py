"""Orbax checkpoints of a workdir (WORKDIR/checkpoints): one manager helper for both trainers, the
main trainer's (train state, data iterator position) items, and its preemption flag.

Saves are atomic (a temporary directory renamed when complete), asynchronous if asked, the newest
`keep` kept. A restore places the train state by the given shardings (Orbax reshards a checkpoint
written on another mesh).
"""

from __future__ import annotations

import signal
import threading

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from lasadgen_jax.workdir import workdir_path

TRAIN_ITEMS = ("state", "data")   # the main trainer's: train state, grain iterator position


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


def save_checkpoint(manager, step: int, state: dict, iterator, force: bool = False) -> bool:
    import grain  # grain (and its worker machinery) loads only in runs that read data

    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=grain.checkpoint.CheckpointSave(iterator)), force=force)


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


def check_data_state_processes(data_directory: epath.Path, step: int) -> None:
    """Refuse (clearly) a checkpoint whose data iterator positions come from another number of processes.

    grain saves one position per process (process_I-of-N.json). Each process reads the records i with
    i % N == I, so a position means nothing to a run of another process count: the parameters would
    restore (Orbax reshards them onto any mesh), the data order cannot continue exactly.
    """
    index, count = jax.process_index(), jax.process_count()
    if not data_directory.is_dir() or (data_directory / f"process_{index}-of-{count}.json").exists():
        return
    written = sorted(path.name for path in data_directory.glob("process_*-of-*.json"))
    counts = sorted({name.rsplit("-of-", 1)[1].removesuffix(".json") for name in written})
    raise ValueError(f"checkpoint {step} in {data_directory.parent.parent}: its data iterator positions were saved "
                     f"by {' or '.join(counts) or 'no'} process(es) ({', '.join(written[:4])}), this run has {count}. "
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
