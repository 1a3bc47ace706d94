"""The launch scripts: the exact gcloud / srun / process commands of --dry-run (golden strings),
refusals of missing or bad arguments with a usage message, the queued-resource restart loop against
a fake gcloud, and run_multinode.py starting real jax.distributed processes on this machine.

Nothing here reaches Google Cloud or a SLURM cluster: those runs are unverified on real systems.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu", "tpu.py")
SBATCH = os.path.join(REPO, "launch", "gpu", "train.sbatch")
MULTINODE = os.path.join(REPO, "launch", "gpu", "run_multinode.py")
WHERE = ["--name=run1", "--zone=us-central2-b", "--project=my-proj"]
SSH = "gcloud compute tpus tpu-vm ssh run1 --zone=us-central2-b --project=my-proj"


def tpu(*arguments, env=None):
    environment = dict(os.environ, TMPDIR="/tmp")
    environment.pop("GCLOUD", None)
    environment.update(env or {})
    return subprocess.run([sys.executable, TPU, *arguments], capture_output=True, text=True, cwd=REPO,
                          env=environment, timeout=60)


def lines(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def refused(result, message: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "usage:" in result.stderr and message in result.stderr, result.stderr


# ----------------------------------------------------------------------------- TPU


def test_tpu_create_commands_per_generation():
    assert lines(tpu("create", *WHERE, "--accelerator=v4", "--size=32", "--dry-run")) == [
        "gcloud compute tpus tpu-vm create run1 --zone=us-central2-b --project=my-proj --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base"]
    assert lines(tpu("create", *WHERE, "--accelerator=v5e", "--size=16", "--capacity=spot", "--dry-run")) == [
        "gcloud compute tpus tpu-vm create run1 --zone=us-central2-b --project=my-proj "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot"]
    assert lines(tpu("create", *WHERE, "--accelerator=v5p", "--size=128", "--dry-run"))[0].endswith(
        "--accelerator-type=v5p-128 --version=v2-alpha-tpuv5")
    assert lines(tpu("create", *WHERE, "--accelerator=v6e", "--size=256", "--runtime-version=mine", "--dry-run"))[
        0].endswith("--accelerator-type=v6e-256 --version=mine")


def test_tpu_up_copies_the_code_installs_copies_tokens_and_starts_every_worker():
    result = tpu("up", *WHERE, "--accelerator=v4", "--size=32", "--tokens=gs://bucket/tokens/imagenet256/",
                 "--config=configs/imagenet256.py:size=L", "--workdir=gs://bucket/runs/l", "--config.batch_size=512",
                 "--dry-run")
    assert lines(result) == [
        "gcloud compute tpus tpu-vm create run1 --zone=us-central2-b --project=my-proj --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base",
        "git archive --format=tar.gz --output=/tmp/lasadgen_jax-run1.tar.gz HEAD",
        "gcloud compute tpus tpu-vm scp /tmp/lasadgen_jax-run1.tar.gz run1:lasadgen_jax.tar.gz --zone=us-central2-b "
        "--project=my-proj --worker=all",
        f"{SSH} --worker=all --command 'set -e; rm -rf \"$HOME/lasadgen_jax\" && mkdir -p \"$HOME/lasadgen_jax\" && "
        "tar -xzf \"$HOME/lasadgen_jax.tar.gz\" -C \"$HOME/lasadgen_jax\" && python3 -m pip install -q -e "
        "\"$HOME/lasadgen_jax\" \"jax[tpu]\" gcsfs'",
        f"{SSH} --worker=all --command 'mkdir -p \"$HOME/tokens\" && gcloud storage rsync --recursive "
        "gs://bucket/tokens/imagenet256 \"$HOME/tokens/imagenet256\"'",
        f"{SSH} --worker=all --command 'rm -f \"$HOME/train.exit\"; setsid nohup bash -c '\"'\"'cd "
        "\"$HOME/lasadgen_jax\" && python3 -m lasadgen_jax.train --config=configs/imagenet256.py:size=L "
        "--workdir=gs://bucket/runs/l --config.distributed.initialize=yes --config.batch_size=512 "
        "\"--config.data.tokens_dir=$HOME/tokens/imagenet256\"; echo $? > \"$HOME/train.exit\"'\"'\"' > "
        "\"$HOME/train.log\" 2>&1 < /dev/null & echo $! > \"$HOME/train.pid\"'",
    ]


def test_tpu_logs_stop_delete_and_git_setup():
    assert lines(tpu("logs", *WHERE, "--worker=all", "--dry-run")) == [
        f"{SSH} --worker=all --command 'tail -n 100 -F \"$HOME/train.log\"'"]
    assert lines(tpu("stop", *WHERE, "--dry-run")) == [
        f"{SSH} --worker=all --command 'kill -TERM -- -$(cat \"$HOME/train.pid\")'"]
    assert lines(tpu("delete", *WHERE, "--dry-run")) == [
        "gcloud compute tpus tpu-vm delete run1 --zone=us-central2-b --project=my-proj --quiet"]
    assert lines(tpu("setup", *WHERE, "--code=git", "--repo=https://example.com/l.git", "--ref=v1",
                     "--jax-version=0.10.2", "--dry-run")) == [
        f"{SSH} --worker=all --command 'set -e; (test -d \"$HOME/lasadgen_jax/.git\" || git clone -q "
        "https://example.com/l.git \"$HOME/lasadgen_jax\") && git -C \"$HOME/lasadgen_jax\" fetch -q origin && "
        "git -C \"$HOME/lasadgen_jax\" checkout -q v1 && python3 -m pip install -q -e \"$HOME/lasadgen_jax\" "
        "\"jax[tpu]==0.10.2\" gcsfs'"]


def test_tpu_queued_dry_run_shows_one_cycle_of_the_loop():
    result = tpu("queued", *WHERE, "--accelerator=v6e", "--size=64", "--code=git", "--repo=https://example.com/l.git",
                 "--config=configs/imagenet256.py", "--workdir=gs://bucket/runs/x", "--config.data.tokens_dir=/mnt/t",
                 "--dry-run")
    output = lines(result)
    assert output[:3] == [
        "gcloud compute tpus queued-resources create run1-qr --node-id=run1 --zone=us-central2-b --project=my-proj "
        "--accelerator-type=v6e-64 --runtime-version=v2-alpha-tpuv6e --spot",
        "# until ACTIVE, every 60 s:",
        "gcloud compute tpus queued-resources describe run1-qr --zone=us-central2-b --project=my-proj "
        "'--format=value(state.state)'"]
    assert "--config.data.tokens_dir=/mnt/t" in output[4] and "tokens/" not in output[4]   # no --tokens copy
    assert output[6] == (f"{SSH} --worker=0 --command 'if [ -f \"$HOME/train.exit\" ]; then echo \"exit=$(cat "
                         "\"$HOME/train.exit\") done=$(grep -c \"^done: \" \"$HOME/train.log\")\"; "
                         "else echo running; fi'")
    assert output[-1] == ("gcloud compute tpus queued-resources delete run1-qr --zone=us-central2-b "
                          "--project=my-proj --force --quiet")


@pytest.mark.parametrize("arguments, message", [
    (["create", "--name=a", "--zone=z", "--accelerator=v4", "--size=32"],
     "the following arguments are required: --project"),
    (["create", *WHERE, "--accelerator=v4", "--size=12"], "--size 12 for --accelerator=v4: must be a multiple of 8"),
    (["create", *WHERE, "--accelerator=v6e", "--size=2"], "must be one of 1, 4, 8"),
    (["create", *WHERE, "--accelerator=v3", "--size=8"], "invalid choice: 'v3'"),
    (["train", *WHERE, "--config=c.py", "--workdir=/local/run", "--tokens=gs://b/t"], "is not a gs:// location"),
    (["train", *WHERE, "--config=c.py", "--workdir=gs://b/r"], "give --tokens=gs://... "),
    (["train", *WHERE, "--config=c.py", "--workdir=gs://b/r", "--tokens=gs://b/t", "--lr=3"],
     "unrecognized arguments: --lr=3"),
    (["setup", *WHERE, "--code=git"], "--code=git needs --repo"),
    (["setup", *WHERE, "--jax-version=latest"], "is not a version"),
    (["delete", *WHERE, "--config.x=1"], "unrecognized arguments: --config.x=1"),
    ([], "the following arguments are required: COMMAND"),
])
def test_tpu_refuses_missing_and_bad_arguments(arguments, message):
    refused(tpu(*arguments), message)


def test_every_tpu_subcommand_has_help():
    for command in ("create", "setup", "train", "logs", "stop", "delete", "up", "queued"):
        result = tpu(command, "--help")
        assert result.returncode == 0 and "--dry-run" in result.stdout, command


FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""Answers the queued-resource state and worker 0's training status from a script; logs every call."""
import json, os, sys
path = os.environ["FAKE_GCLOUD_SCRIPT"]
with open(path) as f:
    script = json.load(f)
argv = sys.argv[1:]
script["calls"].append(argv)
answer, code = "", 0
if argv[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    answer = script["states"].pop(0)
    code = 1 if answer == "NOT_FOUND" else 0
elif "ssh" in argv and "--worker=0" in argv:
    answer = script["statuses"].pop(0)
with open(path, "w") as f:
    json.dump(script, f)
if code:
    sys.exit(code)
print(answer)
'''


def kind(call: list[str]) -> str:
    if call[2] == "queued-resources":
        return call[3]
    command = call[call.index("--command") + 1]
    for word, name in (("train.exit\" ]", "status"), ("lasadgen_jax.train", "train"), ("git clone", "code"),
                       ("storage rsync", "tokens")):
        if word in command:
            return name
    raise AssertionError(call)


def run_loop(tmp_path, states, statuses, *extra):
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"states": states, "statuses": statuses, "calls": []}))
    result = tpu("queued", *WHERE, "--accelerator=v4", "--size=8", "--code=git", "--repo=https://example.com/l.git",
                 "--tokens=gs://b/tokens/t", "--config=c.py", "--workdir=gs://b/runs/r", "--poll-seconds=0", *extra,
                 env={"GCLOUD": str(gcloud), "FAKE_GCLOUD_SCRIPT": str(script)})
    return result, [kind(call) for call in json.loads(script.read_text())["calls"]]


def test_queued_loop_recreates_a_lost_slice_restarts_a_stopped_run_and_ends_when_done(tmp_path):
    states = ["NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "SUSPENDED", "PROVISIONING", "ACTIVE"]
    statuses = ["running", "exit=0 done=0", "exit=0 done=1"]
    result, calls = run_loop(tmp_path, states, statuses)
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls == [
        "describe", "create",                                   # no request yet: ask for one
        "describe", "describe", "code", "tokens", "train",      # waiting, then ACTIVE: set up and start
        "status",                                               # still running
        "describe", "status", "train",                          # stopped by SIGTERM on a live slice: again
        "describe", "delete", "create",                         # preempted: a new slice
        "describe", "describe", "code", "tokens", "train",      # set up again; resumes from the workdir
        "status", "delete",                                     # done: the slice goes
    ]
    assert "training done" in result.stdout


def test_queued_loop_gives_up_after_max_restarts(tmp_path):
    result, calls = run_loop(tmp_path, ["ACTIVE"] * 3, ["exit=1 done=0"] * 2, "--max-restarts=1")
    assert result.returncode == 1 and "giving up" in result.stderr
    # A crash (exit 1): started again once, then given up (the slice is kept, for `tpu.py logs`).
    assert calls == ["describe", "describe", "code", "tokens", "train", "status", "train", "describe", "status"]


# ----------------------------------------------------------------------------- GPU: SLURM


@pytest.fixture(scope="module")
def slurm_bin(tmp_path_factory):
    """A directory with `scontrol show hostnames NODELIST`, answering as SLURM does for gpu-node[07-08]."""
    bin_dir = tmp_path_factory.mktemp("slurm_bin")
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\necho gpu-node07\necho gpu-node08\n')
    scontrol.chmod(0o755)
    return str(bin_dir)


@pytest.fixture(scope="module")
def slow_slurm_bin(tmp_path_factory):
    """`scontrol show hostnames` that writes the first host, pauses, then 2000 more: a reader that
    stops after the first line makes it die of SIGPIPE."""
    bin_dir = tmp_path_factory.mktemp("slow_slurm_bin")
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho gpu-node07\nsleep 0.3\ni=0\nwhile [ $i -lt 2000 ]; do echo gpu-x$i; '
                        'i=$((i+1)); done\n')
    scontrol.chmod(0o755)
    return str(bin_dir)


def test_sbatch_reads_the_whole_host_list(slow_slurm_bin):
    """The first host is taken without closing the pipe early (no SIGPIPE exit under pipefail)."""
    assert lines(sbatch(slow_slurm_bin, "--dry-run", "--config=c.py", "--workdir=/w", "--tokens=/t"))[0] == (
        "export JAX_COORDINATOR_ADDRESS=gpu-node07:24242")


def sbatch(slurm_bin, *arguments, nodes="2", gpus="8"):
    environment = dict(os.environ, SLURM_JOB_NODELIST="gpu-node[07-08]", SLURM_JOB_NUM_NODES=nodes,
                       SLURM_GPUS_ON_NODE=gpus, SLURM_JOB_ID="4242", PATH=f"{slurm_bin}:{os.environ['PATH']}")
    environment.pop("NCCL_NVLS_ENABLE", None)
    return subprocess.run(["bash", SBATCH, *arguments], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env=environment)


def test_sbatch_one_process_per_gpu(slurm_bin):
    assert lines(sbatch(slurm_bin, "--dry-run", "--config=configs/imagenet256.py:size=L", "--workdir=/shared/runs/l",
                        "--tokens=/shared/tokens/imagenet256", "--config.batch_size=512")) == [
        "export JAX_COORDINATOR_ADDRESS=gpu-node07:24242",
        "export NCCL_NVLS_ENABLE=0",
        "srun --kill-on-bad-exit=1 --nodes=2 --ntasks=16 --ntasks-per-node=8 python3 -m lasadgen_jax.train "
        "--config=configs/imagenet256.py:size=L --workdir=/shared/runs/l "
        "--config.data.tokens_dir=/shared/tokens/imagenet256 --config.distributed.initialize=yes "
        "--config.batch_size=512"]


def test_sbatch_one_process_per_node_sees_all_its_gpus(slurm_bin):
    assert lines(sbatch(slurm_bin, "--dry-run", "--per=node", "--port=1234", "--config=c.py", "--workdir=/w",
                        "--tokens=/t", nodes="3", gpus="4")) == [
        "export JAX_COORDINATOR_ADDRESS=gpu-node07:1234",
        "export NCCL_NVLS_ENABLE=0",
        "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
        "srun --kill-on-bad-exit=1 --nodes=3 --ntasks=3 --ntasks-per-node=1 python3 -m lasadgen_jax.train "
        "--config=c.py --workdir=/w --config.data.tokens_dir=/t --config.distributed.initialize=yes"]


@pytest.mark.parametrize("arguments, message", [
    (["--config=c.py", "--tokens=/t"], "--workdir is required"),
    (["--workdir=/w", "--tokens=/t"], "--config is required"),
    (["--config=c.py", "--workdir=/w"], "--tokens is required"),
    (["--config=c.py", "--workdir=/w", "--tokens=/t", "--per=rack"], "--per must be gpu or node"),
    (["--config=c.py", "--workdir=/w", "--tokens=/t", "--port=99999"], "--port must be 1..65535"),
    (["--config=c.py", "--workdir=/w", "--tokens=/t", "--batch=3"], "unrecognized argument '--batch=3'"),
])
def test_sbatch_refuses_missing_and_bad_arguments(slurm_bin, arguments, message):
    refused(sbatch(slurm_bin, *arguments), message)
    assert sbatch(slurm_bin, "--help").returncode == 0


# ----------------------------------------------------------------------------- GPU: plain multi-node


def multinode(*arguments, env=None, timeout=60):
    environment = dict(os.environ, **(env or {}))
    environment.pop("NCCL_NVLS_ENABLE", None)
    return subprocess.run([sys.executable, MULTINODE, *arguments], capture_output=True, text=True, cwd=REPO,
                          env=environment, timeout=timeout)


def test_multinode_dry_run_numbers_the_processes():
    assert lines(multinode("--coordinator=node0:12345", "--num-nodes=2", "--node-rank=1", "--processes-per-node=2",
                           "--dry-run", "--", "python3", "-m", "lasadgen_jax.train", "--config=c.py",
                           "--workdir=/shared/w")) == [
        "env JAX_COORDINATOR_ADDRESS=node0:12345 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=2 JAX_LOCAL_DEVICE_IDS=0 "
        "NCCL_NVLS_ENABLE=0 python3 -m lasadgen_jax.train --config=c.py --workdir=/shared/w",
        "env JAX_COORDINATOR_ADDRESS=node0:12345 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=3 JAX_LOCAL_DEVICE_IDS=1 "
        "NCCL_NVLS_ENABLE=0 python3 -m lasadgen_jax.train --config=c.py --workdir=/shared/w"]
    assert lines(multinode("--coordinator=n:1", "--num-nodes=4", "--node-rank=3", "--dry-run", "--", "x")) == [
        "env JAX_COORDINATOR_ADDRESS=n:1 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=3 NCCL_NVLS_ENABLE=0 x"]


@pytest.mark.parametrize("arguments, message", [
    (["--num-nodes=2", "--node-rank=0", "--", "x"], "the following arguments are required: --coordinator"),
    (["--coordinator=node0", "--num-nodes=2", "--node-rank=0", "--", "x"], "is not HOST:PORT"),
    (["--coordinator=n:1", "--num-nodes=2", "--node-rank=2", "--", "x"], "--node-rank 2 is not in [0, --num-nodes=2)"),
    (["--coordinator=n:1", "--num-nodes=2", "--node-rank=0"], "no command"),
])
def test_multinode_refuses_missing_and_bad_arguments(arguments, message):
    refused(multinode(*arguments), message)


# One os.write per line: the two processes share the pipe, and print() may write a line in pieces
# (unbuffered Python), which can interleave ("PROBEPROBE 0 2 4").
PROBE = ("from lasadgen_jax import distributed; import ml_collections, jax, os; "
         "distributed.maybe_initialize_distributed(ml_collections.ConfigDict(dict(initialize='auto', "
         "coordinator_address=None, num_processes=None, process_id=None))); "
         "os.write(1, f'PROBE {jax.process_index()} {jax.process_count()} {jax.device_count()}\\n'.encode())")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_multinode_starts_processes_that_join_one_jax_run():
    result = multinode(f"--coordinator=localhost:{free_port()}", "--num-nodes=1", "--node-rank=0",
                       "--processes-per-node=2", "--", sys.executable, "-c", PROBE,
                       env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                       timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    probes = sorted(line for line in result.stdout.splitlines() if line.startswith("PROBE"))
    assert probes == ["PROBE 0 2 4", "PROBE 1 2 4"]


def test_multinode_stops_the_others_when_one_process_fails():
    crash_or_wait = ("import os, sys, time; "
                     "sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(120)")
    start = time.time()
    result = multinode("--coordinator=localhost:1", "--num-nodes=1", "--node-rank=0", "--processes-per-node=2",
                       "--", sys.executable, "-c", crash_or_wait)
    assert result.returncode == 3 and "a process exited 3" in result.stderr
    assert time.time() - start < 30
