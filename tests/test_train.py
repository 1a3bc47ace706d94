"""The trainer: learning, determinism, kill/preempt and resume, meshes of 8 fake devices, NaN guard,
gradient accumulation and remat, refusals of bad configs, workdirs and data, divergence, workdir
locks and damaged checkpoints.

Runs that need signals or fake devices are subprocesses of tests/train_runs.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fake_devices_flags, write_synthetic_token_dir
from train_runs import losses, tiny_config

from lasadgen_jax import checkpoints, sharding, train, train_state
from lasadgen_jax.model_io import model_config_from
from lasadgen_jax.workdir import WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(REPO, "tests", "train_runs.py")
NUM_STEPS = 16


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    return write_synthetic_token_dir(str(tmp_path_factory.mktemp("tokens")))


@pytest.fixture(scope="module")
def uninterrupted(tokens_dir, tmp_path_factory):
    """One uninterrupted run of NUM_STEPS steps: its workdir."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    summary = train.train(tiny_config(tokens_dir, NUM_STEPS), workdir)
    assert summary["step"] == NUM_STEPS and not summary["preempted"]
    return workdir


def start_run(workdir, tokens_dir, num_steps=NUM_STEPS):
    return subprocess.Popen([sys.executable, RUNS, "train", workdir, tokens_dir, str(num_steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def wait_for_step(process, workdir, step, timeout=240):
    """Block until the run has logged `step` (metrics.jsonl) or has exited."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(path) and len(losses(workdir)) >= step:
            return
        if process.poll() is not None:
            raise AssertionError(f"run exited early ({process.returncode}):\n{process.stdout.read()}")
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"run did not reach step {step} in {timeout} s")


def checkpoint_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_loss_decreases_and_outputs_exist(uninterrupted):
    run_losses = losses(uninterrupted)
    assert len(run_losses) == NUM_STEPS and all(np.isfinite(run_losses))
    with open(os.path.join(uninterrupted, "metrics.jsonl")) as f:
        waits = [json.loads(line)["data_wait_fraction"] for line in f if line.strip()]
    assert len(waits) == NUM_STEPS and all(0.0 <= wait < 1.0 for wait in waits), waits
    assert np.mean(run_losses[-4:]) < np.mean(run_losses[:4]) - 0.05, run_losses
    assert checkpoint_steps(uninterrupted)[-1] == NUM_STEPS
    assert os.path.isdir(os.path.join(uninterrupted, "params_ema"))
    tensorboard = os.listdir(os.path.join(uninterrupted, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in tensorboard)


def test_preempt_then_kill_then_resume_gives_the_uninterrupted_losses(uninterrupted, tokens_dir, tmp_path):
    """SIGTERM saves and exits 0; SIGKILL loses only the steps after the last checkpoint; the
    resumed run logs exactly the losses of the uninterrupted run with the same seed."""
    workdir = str(tmp_path / "interrupted")
    process = start_run(workdir, tokens_dir)
    wait_for_step(process, workdir, 6)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "preempted (SIGTERM): saved checkpoint" in output
    preempted_at = checkpoint_steps(workdir)[-1]
    assert 6 <= preempted_at < NUM_STEPS and len(losses(workdir)) == preempted_at

    process = start_run(workdir, tokens_dir)
    wait_for_step(process, workdir, min(preempted_at + 6, NUM_STEPS - 1))
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    saved = [step for step in checkpoint_steps(workdir) if step < NUM_STEPS]
    assert saved and saved[-1] >= preempted_at

    summary = train.train(tiny_config(tokens_dir, NUM_STEPS), workdir)
    assert summary["start_step"] == saved[-1]
    np.testing.assert_allclose(losses(workdir), losses(uninterrupted), rtol=1e-6, atol=0)


@pytest.mark.xdist_group("fake_devices")  # tests/run.sh: --dist loadgroup
def test_meshes_of_8_fake_devices_match_one_device(tokens_dir, tmp_path):
    environment = dict(os.environ, XLA_FLAGS=fake_devices_flags(8), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, RUNS, "meshes", str(tmp_path), tokens_dir], capture_output=True,
                            text=True, cwd=REPO, env=environment, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    runs = json.loads(lines[-1][len("RESULT "):])
    single = runs.pop("1x1x1")
    assert single["w1_shard_shape"] == [32, 128]
    for name, run in runs.items():
        np.testing.assert_allclose(run["losses"], single["losses"], rtol=2e-5, err_msg=name)
    # ffn w1 is (embed, mlp) -> (fsdp, tensor); Adam's moments follow their parameter.
    assert runs["8x1x1"]["w1_spec"] == [None, None] and runs["8x1x1"]["w1_shard_shape"] == [32, 128]
    assert runs["2x4x1"]["w1_spec"] == ["fsdp", None] and runs["2x4x1"]["w1_shard_shape"] == [8, 128]
    assert runs["2x2x2"]["w1_spec"] == ["fsdp", "tensor"] and runs["2x2x2"]["w1_shard_shape"] == [16, 64]
    assert runs["2x2x2"]["adam_mu_w1_spec"] == ["fsdp", "tensor"]


def step_parts(config, **model_overrides):
    """(jitted train step, initial state) of a config on one device, outside the loop."""
    config.model.update(**model_overrides)
    model_config = model_config_from(config)
    mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
    setup = train_state.setup_training(config, model_config, mesh, config.num_steps)
    step, state = setup.train_step, setup.initial_state(model_config, config.seed)
    return step, state


def batch(tokens_dir, config):
    iterator = train.open_data(config, tokens_dir, model_config_from(config))
    example = next(iterator)
    return jnp.asarray(example["tokens"]), jnp.asarray(example["label"])


def test_grad_accumulation_with_remat_equals_one_big_batch(tokens_dir):
    no_dropout = dict(class_dropout=0.0, token_dropout=0.0, depth=1)
    config = tiny_config(tokens_dir, 4)
    config.optimizer.warmup_steps = 0
    tokens, labels = batch(tokens_dir, config)
    step, state = step_parts(config, **no_dropout)
    state, metrics = step(state, tokens, labels)

    config = tiny_config(tokens_dir, 4)
    config.optimizer.warmup_steps = 0
    config.grad_accum_steps = 4
    step_accumulated, state_accumulated = step_parts(config, remat="full", **no_dropout)
    state_accumulated, metrics_accumulated = step_accumulated(state_accumulated, tokens, labels)
    np.testing.assert_allclose(metrics_accumulated["loss"], metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_accumulated["grad_norm"], metrics["grad_norm"], rtol=1e-5)
    # Adam's first moment after one step is (1 - b1) x the clipped gradient: linear in the gradient,
    # unlike the first update itself (~ lr x sign(g), which flips for gradients at rounding level).
    first_moment = lambda s: s["opt_state"][1][0].mu
    chex.assert_trees_all_close(first_moment(state_accumulated), first_moment(state), rtol=1e-4, atol=1e-8)


def test_non_finite_loss_skips_the_update_and_counts_it(tokens_dir):
    config = tiny_config(tokens_dir, 4)
    step, state = step_parts(config)
    tokens, labels = batch(tokens_dir, config)
    state["params"]["norm"]["scale"] = state["params"]["norm"]["scale"].at[0].set(jnp.nan)
    before = jax.tree.map(np.asarray, state)
    state, metrics = step(state, tokens, labels)
    assert not bool(metrics["finite"]) and int(state["skipped_steps"]) == 1 and int(state["step"]) == 1
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state["params"]), before["params"])
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state["opt_state"]), before["opt_state"])


# ----------------------------------------------------------------------------- the workdir knows its model


def test_the_printed_sample_command_runs_and_a_mismatching_config_is_refused(tokens_dir, tmp_path, capsys):
    from helpers import tiny_vq_architecture

    from lasadgen_jax.tokenizer import save_tokenizer
    from lasadgen_jax.tokenizer.model import create_vq_model

    tokenizer_dir = str(tmp_path / "tokenizer")   # codebook 64, 4x4 codes of 16x16 images
    save_tokenizer(create_vq_model(tiny_vq_architecture(), seed=0), tokenizer_dir, image_size=16)
    config = tiny_config(tokens_dir, 2)
    config.tokenizer_dir = tokenizer_dir
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    prefix = "sample the EMA params: "
    assert last_line.startswith(prefix), last_line
    command = shlex.split(last_line[len(prefix):])
    assert command[:3] == ["python", "-m", "lasadgen_jax.sample"] and f"--tokenizer={tokenizer_dir}" in command
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)   # as printed (its --out is the default, here under tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.load(tmp_path / "samples" / "images.npz")["arr_0"].shape == (4, 16, 16, 3)
    assert "INFO" not in result.stderr   # Orbax's restore logs are silenced

    result = subprocess.run([sys.executable, "-m", "lasadgen_jax.sample", f"--ckpt={workdir}",
                             "--config=configs/demo.py", f"--out={tmp_path / 'other'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert "does not fit this model config" in result.stderr and "dim: checkpoint 32, config" in result.stderr
    assert "grid: checkpoint (4, 4)" in result.stderr and not os.path.exists(tmp_path / "other")


def test_params_without_model_json_are_refused_naming_shapes(uninterrupted, tmp_path):
    import dataclasses
    import shutil

    from flax import nnx

    from lasadgen_jax import model_io
    from lasadgen_jax.models.lasadgen import LASADGen

    params = str(tmp_path / "params")
    shutil.copytree(os.path.join(uninterrupted, "params_ema"), params)
    recorded = model_io.read_model_config(params)
    assert recorded == model_config_from(tiny_config("unused", 1))
    other = dataclasses.replace(recorded, attention="2d_row")
    with pytest.raises(ValueError, match=r"does not fit this model config \(model.json differs\): attention: "
                                         r"checkpoint '2d', config '2d_row'"):
        model_io.load_params(LASADGen(other, rngs=nnx.Rngs(0)), params)
    os.remove(os.path.join(params, model_io.MODEL_FILE))
    with pytest.raises(ValueError, match=r"does not fit this model config: .*checkpoint \(\d+, 32\), "
                                         r"model \(\d+, 48\)"):
        model_io.load_params(LASADGen(dataclasses.replace(recorded, dim=48), rngs=nnx.Rngs(0)), params)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("entry", ["lasadgen_jax.train", "lasadgen_jax.demo"])
def test_unknown_config_key_is_an_error(entry):
    result = subprocess.run([sys.executable, "-m", entry, "--config=configs/demo.py",
                             "--config.optimizer.learning_rte=1e-3", "--workdir=/nonexistent/never/written"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0
    assert "learning_rte" in result.stderr
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [   # one line, no traceback
        "error: --config.optimizer.learning_rte: config has no such key (did you mean learning_rate?)"]
    assert not os.path.exists("/nonexistent/never/written")


def test_workdir_of_an_incompatible_model_is_refused_and_untouched(uninterrupted, tokens_dir):
    before = {name: os.path.getmtime(os.path.join(uninterrupted, "checkpoints", name))
              for name in os.listdir(os.path.join(uninterrupted, "checkpoints"))}
    config = tiny_config(tokens_dir, NUM_STEPS + 4)
    config.model.dim = 64
    with pytest.raises(ValueError, match="incompatible model.*dim"):
        train.train(config, uninterrupted)
    after = {name: os.path.getmtime(os.path.join(uninterrupted, "checkpoints", name))
             for name in os.listdir(os.path.join(uninterrupted, "checkpoints"))}
    assert after == before


def test_tokens_that_disagree_with_the_model_are_refused_before_writing(tokens_dir, tmp_path):
    config = tiny_config(tokens_dir, 4)
    config.model.grid = (4, 8)
    with pytest.raises(ValueError, match="4x4 grid.*wants 4x8"):
        train.train(config, str(tmp_path / "grid"))
    config = tiny_config(tokens_dir, 4)
    config.model.num_classes = 3
    config.sample.classes = (0, 1, 2)
    with pytest.raises(ValueError, match="4 classes.*only 3"):
        train.train(config, str(tmp_path / "classes"))
    assert not os.path.exists(tmp_path / "grid") and not os.path.exists(tmp_path / "classes")


def test_bad_settings_name_their_config_key(tokens_dir, tmp_path):
    cases = [
        (dict(batch_size=6), "config.batch_size 6 must be divisible"),
        (dict(ema_decay=1.0), "config.ema_decay"),
        (dict(mesh=dict(data=3, fsdp=1, tensor=1)), "config.mesh"),
    ]
    for overrides, message in cases:
        config = tiny_config(tokens_dir, 4)
        config.grad_accum_steps = 4 if "batch_size" in overrides else 1
        config.update(overrides)
        with pytest.raises(ValueError, match=message):
            train.train(config, str(tmp_path / "bad"))
    config = tiny_config(tokens_dir, 4)
    config.sample.classes = (0, 9)
    with pytest.raises(ValueError, match="config.sample.classes"):
        train.train(config, str(tmp_path / "bad"))


def test_demo_refuses_token_and_tokenizer_directories_it_would_not_write(tokens_dir, tmp_path):
    from lasadgen_jax import demo

    config = tiny_config(tokens_dir, 4)   # config.data.tokens_dir set: the demo writes its own
    with pytest.raises(ValueError, match="config.data.tokens_dir.*the demo writes its own tokens"):
        demo.run_demo(config, str(tmp_path / "demo"))
    assert not os.path.exists(tmp_path / "demo")


# ----------------------------------------------------------------------------- guards: divergence, locks, damage


def test_a_diverging_run_stops_without_saving_non_finite_state(tokens_dir, tmp_path):
    """A learning rate that overflows float32 gives finite losses but non-finite updates: every step is
    skipped (the state kept), the run stops at config.max_consecutive_skips naming the steps, the saved
    checkpoint is intact (summed, no temporary directory) and holds finite values, the lock is released."""
    workdir = str(tmp_path / "diverged")
    config = tiny_config(tokens_dir, 8)
    config.optimizer.update(learning_rate=1e39, warmup_steps=0)
    config.max_consecutive_skips = 3
    config.checkpoint.every_steps = 2
    with pytest.raises(train_state.TrainingDiverged, match="steps 1-3: 3 steps in a row skipped"):
        train.train(config, workdir)
    assert all(line["skipped_steps"] == line["step"] for line in map(json.loads, open(f"{workdir}/metrics.jsonl")))
    directory = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(directory)) == ["1", "2"]   # Orbax saves the first step too; no temporary left
    assert all(os.path.isfile(os.path.join(directory, name, checkpoints.CHECKSUM_FILE)) for name in ("1", "2"))
    assert not os.path.exists(os.path.join(workdir, "params_ema")) and not os.path.exists(os.path.join(workdir, "lock"))
    state, step = restore_from(workdir, tokens_dir)
    assert step == 2 and checkpoints.non_finite_leaves(state) == [] and int(state["skipped_steps"]) == 2
    with pytest.raises(FloatingPointError, match=r"refusing to save checkpoint 5: non-finite values in \['params'\]"):
        checkpoints.check_finite_state({"params": jnp.array([1.0, jnp.inf]), "step": jnp.int32(5)}, 5)


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", float("nan"), "config.optimizer.learning_rate must be a finite number"),
    ("learning_rate", 0.0, "config.optimizer.learning_rate must be > 0"),
    ("b1", 1.0, r"config.optimizer.b1 must be in \[0, 1\)"),
    ("b2", -0.1, r"config.optimizer.b2 must be in \[0, 1\)"),
    ("eps", 0.0, "config.optimizer.eps must be > 0"),
    ("weight_decay", float("inf"), "config.optimizer.weight_decay must be a finite number"),
    ("grad_clip_norm", 0.0, "config.optimizer.grad_clip_norm must be > 0"),
    ("warmup_steps", -1, "config.optimizer.warmup_steps must be >= 0"),
])
def test_bad_optimizer_settings_are_refused_before_writing(tokens_dir, tmp_path, key, value, message):
    config = tiny_config(tokens_dir, 4)
    config.optimizer[key] = value
    with pytest.raises(ValueError, match=message):
        train.train(config, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")


def test_a_refused_run_leaves_the_workdir_unclaimed(tokens_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(tokens_dir, 4)
    config.batch_size = 20000   # more than the records: refused by the data pipeline
    with pytest.raises(ValueError, match="fewer than one batch of 20000"):
        train.train(config, workdir)
    assert not os.path.exists(workdir)
    config = tiny_config(tokens_dir, 4)
    train.claim_train_workdir(workdir, model_config_from(config), config)   # the correct run may claim it


def test_a_workdir_in_use_is_refused_and_a_stale_lock_taken_over(tokens_dir, tmp_path, capsys):
    workdir = tmp_path / "busy"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (workdir / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                  "started": "2026-12-06T00:00:00Z"}))
        with pytest.raises(ValueError, match=rf"in use by another run \(host {socket.gethostname()}, PID {holder.pid}"):
            train.train(tiny_config(tokens_dir, 4), str(workdir))
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((workdir / "lock").read_text())["pid"] == holder.pid   # the holder's lock is left alone
    with WorkdirLock(str(workdir), "test"):   # now dead: taken over
        assert json.loads((workdir / "lock").read_text())["pid"] == os.getpid()
    assert f"PID {holder.pid}" in capsys.readouterr().err and not (workdir / "lock").exists()


def restore_from(workdir, tokens_dir):
    """(train state, step) of the workdir's newest intact checkpoint, restored as the trainer does."""
    config = tiny_config(tokens_dir, NUM_STEPS)
    model_config = model_config_from(config)
    setup = train_state.setup_training(config, model_config, sharding.make_mesh(config.mesh.to_dict(),
                                                                                jax.devices()[:1]), NUM_STEPS)
    manager = checkpoints.train_checkpoint_manager(workdir, config)
    try:
        return checkpoints.restore_latest_train_state(manager, setup.abstract_state, setup.state_shardings,
                                                      train.open_data(config, tokens_dir, model_config))
    finally:
        manager.close()


def largest_file(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return max((path for path in files if not path.endswith(".json")), key=os.path.getsize)


def test_damaged_checkpoints_are_named_and_skipped(uninterrupted, tokens_dir, tmp_path, capsys):
    assert checkpoint_steps(uninterrupted) == [8, 12, 16]
    workdir = str(tmp_path / "damaged")
    shutil.copytree(uninterrupted, workdir)
    checkpoints_dir = os.path.join(workdir, "checkpoints")
    with open(largest_file(os.path.join(checkpoints_dir, "16", "state")), "r+b") as f:   # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    os.remove(os.path.join(checkpoints_dir, "12", "data", "process_0-of-1.json"))   # the iterator position
    _, step = restore_from(workdir, tokens_dir)
    err = capsys.readouterr().err
    assert step == 8
    assert "checkpoint 16 at" in err and "is damaged: altered state/" in err
    assert "checkpoint 12 at" in err and "is damaged: missing data/process_0-of-1.json" in err
    assert "resuming from checkpoint 8, the newest intact one (damaged: [16, 12])" in err
    assert sorted(os.listdir(os.path.join(workdir, "damaged_checkpoints"))) == ["12", "16"]

    workdir = str(tmp_path / "truncated")   # a checkpoint without checksums (killed before they were written)
    shutil.copytree(uninterrupted, workdir)
    os.remove(os.path.join(workdir, "checkpoints", "16", checkpoints.CHECKSUM_FILE))
    path = largest_file(os.path.join(workdir, "checkpoints", "16", "state"))
    os.truncate(path, os.path.getsize(path) // 2)
    _, step = restore_from(workdir, tokens_dir)
    assert step == 12 and "checkpoint 16 at" in capsys.readouterr().err

    workdir = str(tmp_path / "non_finite")   # intact files (checksums agree) that hold a NaN: not resumed from
    shutil.copytree(uninterrupted, workdir)
    step_dir = os.path.join(workdir, "checkpoints", "16")
    import orbax.checkpoint as ocp
    from etils import epath

    state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    state["params"] = jax.tree.map(lambda leaf: np.full_like(leaf, np.nan) if np.ndim(leaf) == 2 else leaf,
                                   state["params"])
    shutil.rmtree(os.path.join(step_dir, "state"))
    with ocp.StandardCheckpointer() as writer:
        writer.save(os.path.join(step_dir, "state"), state)
    sums = {name: digest for name, digest in checkpoints.file_digests(epath.Path(step_dir)).items()
            if name != checkpoints.CHECKSUM_FILE}
    with open(os.path.join(step_dir, checkpoints.CHECKSUM_FILE), "w") as f:
        json.dump({"sha256": sums}, f)
    _, step = restore_from(workdir, tokens_dir)
    err = capsys.readouterr().err
    assert step == 12 and "checkpoint 16 at" in err and "holds non-finite values in" in err, err
    assert os.listdir(os.path.join(workdir, "damaged_checkpoints")) == ["16"]

    workdir = str(tmp_path / "emptied")
    shutil.copytree(uninterrupted, workdir)
    for name in os.listdir(os.path.join(workdir, "checkpoints")):
        shutil.rmtree(os.path.join(workdir, "checkpoints", name))
    with pytest.raises(ValueError, match=r"checkpoints holds no checkpoint, but .*metrics.jsonl logs steps up to 16"):
        train.train(tiny_config(tokens_dir, NUM_STEPS), workdir)
    assert len(losses(workdir)) == NUM_STEPS
