"""A training run's workdir: claiming it (a run file naming the kind of run and the model that owns it),
atomic writes, paths for Orbax, and which inputs may live on gs://.

The workdir may be a gs:// URI (etils.epath and Orbax; docs/training.md, "Scaling out"); the trainers
claim it before writing anything else, so that a workdir of another model is refused, not overwritten,
and hold WORKDIR/lock while they run, so that a second trainer on the same workdir is refused.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import fsspec
import jax
import ml_collections
from etils import epath

from lasadgen_jax.distributed import sync_processes
from lasadgen_jax.metric_writer import is_remote

RUN_FILE = "run.json"
LOCK_FILE = "lock"


def claim_workdir(workdir: str, kind: str, identity: dict, *, run_file: str = RUN_FILE,
                  identity_key: str = "model_identity", extra: dict | None = None,
                  foreign_marker: str | None = None) -> None:
    """Refuse a workdir that belongs to another kind of run or to another model; else mark it as this run's.

    identity: the JSON-able fields that decide whether the workdir's checkpoints fit the model. A workdir
    without the run file is refused when it holds `foreign_marker` (e.g. "checkpoints"), or, when
    foreign_marker is None, when it holds anything at all. Every process checks; process 0 writes the
    run file ({"kind", identity_key: identity, **extra}) once all of them have looked.
    """
    directory = epath.Path(workdir)
    path = directory / run_file
    if path.is_file():
        run = json.loads(path.read_text())
        if run.get("kind") != kind:
            raise ValueError(f"--workdir {workdir!r}: {path} is not a {kind} run; use another workdir")
        held = run.get(identity_key, {})
        differ = {k: (held.get(k), identity[k]) for k in identity if held.get(k) != identity[k]}
        if differ:
            raise ValueError(f"--workdir {workdir!r} holds another model's run: checkpoints of an incompatible "
                             f"model (field: (workdir's, config's) = {differ}); nothing was overwritten. "
                             f"Use a fresh workdir or the workdir's model config.")
        return
    if foreign_marker is not None and (directory / foreign_marker).is_dir():
        raise ValueError(f"--workdir {workdir!r} has {foreign_marker}/ but no {run_file}: not a {kind} run; "
                         f"refusing to write into it")
    if foreign_marker is None and directory.is_dir() and any(directory.iterdir()):
        raise ValueError(f"--workdir {workdir!r} is not empty and holds no {run_file}: refusing to write into it")
    sync_processes(f"{kind}: workdir checked")   # else process 0's run file could alarm another process
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        run = {"kind": kind, identity_key: identity, **(extra or {})}
        write_bytes_atomically(path, json.dumps(run, indent=1, sort_keys=True).encode())


def write_bytes_atomically(path: epath.Path, data: bytes) -> None:
    """Locally: a temporary file renamed into place. On object stores (gs://) a write is atomic already."""
    path = epath.Path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    temporary = path.parent / f"{path.name}.tmp-{os.getpid()}"
    temporary.write_bytes(data)
    os.replace(temporary, path)


def workdir_path(workdir: str, name: str) -> epath.Path:
    """WORKDIR/name for Orbax: absolute when local, the URI itself on gs://."""
    if is_remote(workdir):
        return epath.Path(workdir) / name
    return epath.Path(os.path.abspath(os.path.join(workdir, name)))


def check_locations(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The workdir may be a gs:// URI (checkpoints, run.json, metrics, samples, params_ema go through
    etils.epath and Orbax); the inputs read with plain file operations must be local or mounted."""
    local_only = {"config.data.tokens_dir": config.data.tokens_dir, "config.tokenizer_dir": config.tokenizer_dir,
                  "config.eval.reference": config.eval.reference, "config.eval.inception": config.eval.inception}
    remote = {key: value for key, value in local_only.items() if value is not None and is_remote(value)}
    if remote:
        raise ValueError(f"{remote}: these are read from a local (or mounted, e.g. gcsfuse) directory; copy them "
                         f"to every host first (launch/tpu/tpu.py --tokens does so for the tokens)")
    if not is_remote(workdir):
        return
    if config.eval.every_steps:
        raise ValueError(f"--workdir {workdir!r}: periodic evaluation (config.eval.every_steps) caches reference "
                         f"statistics in a local workdir only")
    try:   # etils.epath reaches gs:// through fsspec when TensorFlow is absent
        fsspec.get_filesystem_class(workdir.split("://", 1)[0])
    except (ImportError, ValueError) as error:
        raise ValueError(f"--workdir {workdir!r}: {error} (gs:// needs `pip install gcsfs`)") from None


class WorkdirLock:
    """WORKDIR/lock, created exclusively (O_CREAT | O_EXCL) by process 0 and holding its host, PID and
    start time; removed on exit, exceptions included. A second trainer is refused naming the holder; a
    lock left by a process that died on this host (its PID no longer alive) is taken over, saying so.

    Local (and mounted) workdirs only: object stores (gs://) have no exclusive create through epath,
    so a gs:// workdir is not locked, and one run at a time there is up to whoever starts them.
    """

    def __init__(self, workdir: str, kind: str):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.kind = kind
        self.held = False

    def __enter__(self):
        if jax.process_index() != 0 or is_remote(self.path):
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(descriptor, "w") as f:
                json.dump(holder, f)
            self.held = True
            return self
        raise ValueError(f"--workdir {str(self.path.parent)!r}: could not take {self.path}; another run took it")

    def _take_over_if_stale(self) -> None:
        """Move aside a lock whose process is gone (same host, PID not alive); refuse a live one."""
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):   # released meanwhile, or half-written: look again
            holder = {}
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not process_alive(pid):
            try:
                os.rename(self.path, f"{self.path}.stale-{pid}")   # only one taker succeeds
            except FileNotFoundError:
                return
            os.remove(f"{self.path}.stale-{pid}")
            print(f"taking over {self.path}: its holder (host {host}, PID {pid}, started {holder.get('started')}) "
                  f"is no longer running", file=sys.stderr, flush=True)
            return
        if holder:
            raise ValueError(f"--workdir {str(self.path.parent)!r} is in use by another run (host {host}, PID {pid}, "
                             f"started {holder.get('started')}; {self.path}); wait for it to end, or remove the "
                             f"lock file if that process is gone")

    def __exit__(self, *exc):
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (FileNotFoundError, ValueError):
                pass
            self.held = False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, someone else's
        return True
    return True
