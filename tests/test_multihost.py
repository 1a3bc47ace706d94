"""Multi-host training on one machine: two processes of 4 fake CPU devices each, joined by
jax.distributed (a coordinator on localhost, gloo collectives), against one process of 8 devices that
reads the same global batches; SIGTERM to one of them; resuming with another process count (refused)
and onto other meshes (resharded). Also where jax.distributed.initialize's arguments come from.

The runs are subprocesses of tests/train_runs.py, each with a timeout: a hang fails, it never blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from helpers import fake_devices_flags, finish_processes, launch_processes, write_synthetic_token_dir
from train_runs import losses, multihost_config

from lasadgen_jax import train, train_config
from lasadgen_jax.distributed import distributed_arguments

# One xdist worker runs every test of 8 fake devices, one at a time (tests/run.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("fake_devices")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(REPO, "tests", "train_runs.py")
NUM_STEPS = 20
TIMEOUT = 240   # seconds for one run (about 35 s on two busy cores)


def start_hosts(workdir: str, tokens_dir: str, log_dir, num_processes: int = 2, devices_per_process: int = 4):
    """num_processes processes of one run, configured through the environment as launch/gpu sets it."""
    return launch_processes([sys.executable, RUNS, "host", workdir, tokens_dir, str(NUM_STEPS)], log_dir,
                            num_processes, devices_per_process)


def finish(processes, log_dir, timeout: float = TIMEOUT) -> list[str]:
    """Wait for every process (killing all of them at the deadline); their outputs."""
    return finish_processes(processes, log_dir, timeout)


def result_of(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def checkpoint_steps(workdir):
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    return write_synthetic_token_dir(str(tmp_path_factory.mktemp("tokens")))


@pytest.fixture(scope="module")
def one_process(tokens_dir, tmp_path_factory):
    """The reference: one process, 8 devices, each global batch what the two processes read together."""
    workdir = str(tmp_path_factory.mktemp("one_process"))
    environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=fake_devices_flags(8))
    result = subprocess.run([sys.executable, RUNS, "hosts_in_one", workdir, tokens_dir, str(NUM_STEPS), "2"],
                            capture_output=True, text=True, cwd=REPO, env=environment, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result_of(result.stdout)["step"] == NUM_STEPS
    return workdir


@pytest.fixture(scope="module")
def preempted_hosts(tokens_dir, tmp_path_factory):
    """Two processes, SIGTERM to process 1 only once step 3 is logged: (workdir, their outputs)."""
    workdir = str(tmp_path_factory.mktemp("two_processes"))
    log_dir = str(tmp_path_factory.mktemp("logs_preempted"))
    processes = start_hosts(workdir, tokens_dir, log_dir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + TIMEOUT
    while not (os.path.isfile(metrics) and len(losses(workdir)) >= 3):
        if time.time() > deadline or any(process.poll() is not None for process in processes):
            finish(processes, log_dir, timeout=1)
            raise AssertionError("the two processes did not reach step 3")
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)
    return workdir, finish(processes, log_dir)


def test_sigterm_to_one_process_stops_both_at_one_saved_step(preempted_hosts):
    workdir, outputs = preempted_hosts
    results = [result_of(output) for output in outputs]
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["preempted"] for r in results), results
    stopped = {r["step"] for r in results}
    assert len(stopped) == 1, f"the processes stopped at different steps {stopped}"
    step = stopped.pop()
    assert 3 <= step < NUM_STEPS and checkpoint_steps(workdir)[-1] == step
    assert "preempted (SIGTERM): saved checkpoint" in outputs[0]   # process 0 reports for both
    # Every process saved its own data iterator position with the train state.
    data = os.path.join(workdir, "checkpoints", str(step), "data")
    assert sorted(os.listdir(data)) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    assert len(losses(workdir)) == step   # only process 0 writes metrics


def test_two_processes_resumed_give_the_losses_of_one_process_of_8_devices(preempted_hosts, one_process,
                                                                          tokens_dir, tmp_path):
    workdir, _ = preempted_hosts
    stopped_at = checkpoint_steps(workdir)[-1]
    results = [result_of(output) for output in finish(start_hosts(workdir, tokens_dir, str(tmp_path)), str(tmp_path))]
    assert [(r["start_step"], r["step"], r["preempted"]) for r in results] == [(stopped_at, NUM_STEPS, False)] * 2
    # Logged once per step (process 0 alone writes), equal to the one-process run's.
    np.testing.assert_allclose(losses(workdir), losses(one_process), rtol=2e-5, atol=0)
    # The sample grid gathers tokens sampled on both processes' devices: the same picture.
    with open(os.path.join(workdir, "samples", f"step_{NUM_STEPS:07d}.png"), "rb") as f:
        two = f.read()
    with open(os.path.join(one_process, "samples", f"step_{NUM_STEPS:07d}.png"), "rb") as f:
        assert f.read() == two
    assert os.path.isdir(os.path.join(workdir, "params_ema"))


def test_resuming_with_another_process_count_is_refused_naming_it(preempted_hosts, tokens_dir, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(preempted_hosts[0], workdir)
    config = multihost_config(tokens_dir, NUM_STEPS + 4)
    with pytest.raises(ValueError, match=r"saved by 2 process\(es\).*this run has 1.*same number of processes"):
        train.train(config, workdir)


def test_checkpoint_of_mesh_8x1x1_resumes_on_2x2x2_and_on_one_device(tokens_dir, tmp_path):
    """Orbax reshards the train state onto the new mesh; the losses continue as if uninterrupted."""
    environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=fake_devices_flags(8))
    result = subprocess.run([sys.executable, RUNS, "reshard", str(tmp_path), tokens_dir], capture_output=True,
                            text=True, cwd=REPO, env=environment, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = result_of(result.stdout)
    uninterrupted = runs.pop("8x1x1")["losses"]
    assert len(uninterrupted) == 8
    for name, run in runs.items():
        assert run["start_step"] == 4, name
        np.testing.assert_allclose(run["losses"], uninterrupted, rtol=2e-5, atol=0, err_msg=name)
    assert runs["2x2x2"]["w1_spec"] == ["fsdp", "tensor"] and runs["2x2x2"]["w1_devices"] == 8
    assert runs["1x1x1"]["w1_spec"] == [None, None] and runs["1x1x1"]["w1_devices"] == 1


def test_two_processes_extract_disjoint_shards_and_process_0_writes_the_manifest(tmp_path):
    """`python -m lasadgen_jax.data.extract` on two jax.distributed processes, as on two hosts."""
    from helpers import tiny_vq_architecture
    from PIL import Image

    from lasadgen_jax.data import manifest as manifests
    from lasadgen_jax.tokenizer import save_tokenizer
    from lasadgen_jax.tokenizer.model import create_vq_model

    tokenizer = str(tmp_path / "tokenizer")
    save_tokenizer(create_vq_model(tiny_vq_architecture(), seed=0), tokenizer)
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        os.makedirs(tmp_path / "images" / label)
        for number in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{number}.png")
    out = str(tmp_path / "tokens")
    processes = launch_processes(
        [sys.executable, "-m", "lasadgen_jax.data.extract", f"--tokenizer={tokenizer}",
         f"--source=imagefolder:{tmp_path / 'images'}", "--image_size=16", "--crops=flip",
         f"--out={out}", "--shard_size=2", "--batch_size=2", "--workers=1"], str(tmp_path))
    outputs = finish(processes, str(tmp_path))
    # 6 images in shards of 2: process 0 writes shards 0 and 2, process 1 shard 1; process 0 waits for
    # process 1 (a barrier) and then lists all three in the manifest.
    assert "wrote 2 shard(s)" in outputs[0] and "manifest: 6 records" in outputs[0], outputs[0][-2000:]
    assert "wrote 1 shard(s)" in outputs[1] and "manifest not written" in outputs[1], outputs[1][-2000:]
    manifest = manifests.read_manifest(out)
    assert [shard["records"] for shard in manifest["shards"]] == [2, 2, 2]


def test_batch_that_the_mesh_does_not_split_evenly_is_refused(tokens_dir):
    from types import SimpleNamespace

    config = multihost_config(tokens_dir, 4)
    config.batch_size, config.grad_accum_steps = 24, 2
    train_config.check_batch_fits_mesh(config, SimpleNamespace(shape={"data": 4, "fsdp": 3, "tensor": 2}))
    with pytest.raises(ValueError, match=r"config.batch_size 24 must be divisible by config.grad_accum_steps \(2\) "
                                         r"x the mesh's data x fsdp \(8 x 1\)"):
        train_config.check_batch_fits_mesh(config, SimpleNamespace(shape={"data": 8, "fsdp": 1, "tensor": 1}))


# ----------------------------------------------------------------------------- initialize's arguments


def distributed(**overrides):
    values = dict(initialize="auto", coordinator_address=None, num_processes=None, process_id=None)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def test_single_process_environments_do_not_initialize():
    assert distributed_arguments(distributed(), {}) is None
    assert distributed_arguments(distributed(), {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert distributed_arguments(distributed(), {"JAX_NUM_PROCESSES": "1"}) is None
    assert distributed_arguments(distributed(initialize="no"), {"JAX_COORDINATOR_ADDRESS": "h:1"}) is None


def test_arguments_come_from_the_config_else_the_environment():
    environ = {"JAX_COORDINATOR_ADDRESS": "node0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed_arguments(distributed(), environ) == {
        "coordinator_address": "node0:1234", "num_processes": 4, "process_id": 3}
    assert distributed_arguments(distributed(process_id=1, coordinator_address="other:9"), environ) == {
        "coordinator_address": "other:9", "num_processes": 4, "process_id": 1}
    # SLURM (and Open MPI, TPU): what is left unset, jax.distributed.initialize fills in from the cluster.
    slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "5", "JAX_COORDINATOR_ADDRESS": "node0:1234"}
    assert distributed_arguments(distributed(), slurm) == {
        "coordinator_address": "node0:1234", "num_processes": None, "process_id": None}
    assert distributed_arguments(distributed(), {"OMPI_COMM_WORLD_SIZE": "2"}) == {
        "coordinator_address": None, "num_processes": None, "process_id": None}
    assert distributed_arguments(distributed(initialize="yes"), {}) == {
        "coordinator_address": None, "num_processes": None, "process_id": None}


def test_bad_distributed_settings_name_their_source():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        distributed_arguments(distributed(), {"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match=r"process_id \(or JAX_PROCESS_ID\) 2 is not in \[0, num_processes=2\)"):
        distributed_arguments(distributed(), {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="config.distributed.initialize"):
        distributed_arguments(distributed(initialize="maybe"), {})
