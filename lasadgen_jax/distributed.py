"""Process set-up of a multi-host run: jax.distributed.initialize from the config or the environment,
and a barrier. Used by the trainer, token extraction, sampling and evaluation."""

from __future__ import annotations

import os

import jax
import ml_collections
from jax.experimental import multihost_utils

# config.distributed key -> the environment variable that supplies it when the config leaves it unset.
DISTRIBUTED_ENVIRONMENT = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
                           "process_id": "JAX_PROCESS_ID"}


def distributed_arguments(distributed: ml_collections.ConfigDict, environ) -> dict | None:
    """The arguments of jax.distributed.initialize, or None for a run of one process.

    Each of coordinator_address, num_processes and process_id comes from config.distributed, else from
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (launch/gpu/run_multinode.py sets
    them); whatever is still None, jax fills in from the cluster (SLURM, Open MPI, Cloud TPU metadata).
    'auto' initializes when one of these names a coordinator or several processes, or when the
    environment is a SLURM job step of several tasks, an Open MPI job or a multi-host TPU.
    """
    mode = distributed.initialize
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed.initialize must be 'auto', 'yes' or 'no', got {mode!r}")
    if mode == "no":
        return None
    arguments = {}
    for key, variable in DISTRIBUTED_ENVIRONMENT.items():
        value = distributed[key]
        if value is None and environ.get(variable, "") != "":
            value = environ[variable]
            if key != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"environment variable {variable}={value!r} is not an integer") from None
        arguments[key] = value
    num_processes, process_id = arguments["num_processes"], arguments["process_id"]
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"config.distributed.num_processes (or JAX_NUM_PROCESSES) must be >= 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ValueError(f"config.distributed.process_id (or JAX_PROCESS_ID) {process_id} is not in "
                         f"[0, num_processes={num_processes})")
    cluster = (
        (int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ)
        or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in environ.get("TPU_WORKER_HOSTNAMES", "")
    )
    if mode == "auto" and arguments["coordinator_address"] is None and (num_processes or 1) == 1 and not cluster:
        return None
    return arguments


def maybe_initialize_distributed(distributed: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize() when the config or the environment asks for it (distributed_arguments)."""
    arguments = distributed_arguments(distributed, os.environ)
    if arguments is None or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(**arguments)
    except ValueError as error:
        raise ValueError(f"jax.distributed.initialize({arguments}): {error}. Set config.distributed."
                         f"coordinator_address, num_processes and process_id (or JAX_COORDINATOR_ADDRESS, "
                         f"JAX_NUM_PROCESSES, JAX_PROCESS_ID), or run under SLURM / Open MPI / a Cloud TPU "
                         f"VM") from None


def initialize_from_environment(mode: str) -> None:
    """A command-line tool's --distributed=auto|yes|no: as config.distributed.initialize, with the
    coordinator, process count and index from the environment (distributed_arguments)."""
    maybe_initialize_distributed(ml_collections.ConfigDict(dict(
        initialize=mode, coordinator_address=None, num_processes=None, process_id=None)))


def sync_processes(name: str) -> None:
    """A barrier across processes (nothing in a run of one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
