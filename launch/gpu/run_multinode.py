#!/usr/bin/env python3
"""Start one node's processes of a multi-node JAX run without a scheduler (run it on every node).

    # on node 0 (its address: node0) and, with --node-rank=1, on node 1:
    python3 launch/gpu/run_multinode.py --coordinator=node0:12345 --num-nodes=2 --node-rank=0 \\
        [--processes-per-node=8] -- python3 -m lasadgen_jax.train --config=configs/imagenet256.py \\
        --workdir=/shared/runs/l --config.data.tokens_dir=/data/tokens/imagenet256

Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES = nodes x processes per node and
JAX_PROCESS_ID = node rank x processes per node + local rank, which the trainer (and
lasadgen_jax.data.extract) hand to jax.distributed.initialize. With one process per node (the
default) it drives all the node's GPUs; with --processes-per-node=K, process k drives GPU k
(JAX_LOCAL_DEVICE_IDS=k). NCCL_NVLS_ENABLE=0 unless the environment sets it (launch/README.md).
SIGTERM/SIGINT are passed on to every process (the trainer saves a checkpoint); when one process
fails, the others are stopped and its exit status is returned. --dry-run prints the commands.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

GRACE_SECONDS = 60   # after SIGTERM to the others when one process failed: then SIGKILL


def process_environments(args) -> list[dict]:
    """The variables each of this node's processes gets (on top of the node's environment)."""
    total = args.num_nodes * args.processes_per_node
    environments = []
    for local_rank in range(args.processes_per_node):
        variables = {"JAX_COORDINATOR_ADDRESS": args.coordinator, "JAX_NUM_PROCESSES": str(total),
                     "JAX_PROCESS_ID": str(args.node_rank * args.processes_per_node + local_rank)}
        if args.processes_per_node > 1:
            variables["JAX_LOCAL_DEVICE_IDS"] = str(local_rank)
        if "NCCL_NVLS_ENABLE" not in os.environ:
            variables["NCCL_NVLS_ENABLE"] = "0"
        environments.append(variables)
    return environments


def run(args) -> int:
    children = []

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for variables in process_environments(args):
            children.append(subprocess.Popen(args.command, env={**os.environ, **variables}))
        failed = None
        while any(child.poll() is None for child in children):
            failed = next((c for c in children if c.poll() not in (None, 0)), None)
            if failed is not None:
                break
            time.sleep(0.2)
        if failed is None:
            failed = next((c for c in children if c.returncode != 0), None)
        if failed is not None:
            print(f"run_multinode: a process exited {failed.returncode}; stopping the others", file=sys.stderr)
            forward(signal.SIGTERM, None)
            deadline = time.time() + GRACE_SECONDS
            for child in children:
                try:
                    child.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            return failed.returncode if failed.returncode > 0 else 128 - failed.returncode
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def parse(argv):
    parser = argparse.ArgumentParser(prog="run_multinode.py", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --coordinator=HOST:PORT --num-nodes=N --node-rank=R "
                                           "[--processes-per-node=K] [--dry-run] -- COMMAND ...")
    parser.add_argument("--coordinator", required=True, help="HOST:PORT of node 0, reachable from every node")
    parser.add_argument("--num-nodes", required=True, type=int)
    parser.add_argument("--node-rank", required=True, type=int, help="this node's number, 0 .. num-nodes-1")
    parser.add_argument("--processes-per-node", type=int, default=1,
                        help="1: one process drives all local GPUs; K: one process per GPU (K = GPUs per node)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command every process runs")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        parser.error(f"--coordinator {args.coordinator!r} is not HOST:PORT")
    if args.num_nodes < 1 or args.processes_per_node < 1:
        parser.error("--num-nodes and --processes-per-node must be >= 1")
    if not 0 <= args.node_rank < args.num_nodes:
        parser.error(f"--node-rank {args.node_rank} is not in [0, --num-nodes={args.num_nodes})")
    if not args.command:
        parser.error("no command: put it after --, e.g. -- python3 -m lasadgen_jax.train --config=... --workdir=...")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.dry_run:
        for variables in process_environments(args):
            print(shlex.join(["env", *(f"{k}={v}" for k, v in variables.items()), *args.command]))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
