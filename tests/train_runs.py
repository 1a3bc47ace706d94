"""Trainer runs that tests start as subprocesses (signals, fake devices): `python tests/train_runs.py MODE ...`.

    train  WORKDIR TOKENS NUM_STEPS           a tiny training run (killed or preempted by the test)
    meshes WORKDIR TOKENS                     with 8 fake CPU devices: the same steps on several meshes,
                                              printing one JSON line of losses and parameter shardings
    host   WORKDIR TOKENS NUM_STEPS           one process of a multi-process run (JAX_COORDINATOR_ADDRESS,
                                              JAX_NUM_PROCESSES, JAX_PROCESS_ID from the test) of
                                              multihost_config
    hosts_in_one WORKDIR TOKENS NUM_STEPS HOSTS   the same run in one process over all its devices, each
                                              batch the concatenation of what HOSTS processes would read
    reshard WORKDIR TOKENS                    with 8 fake CPU devices: a run on mesh (8,1,1), and its
                                              middle checkpoint resumed on (2,2,2) and on one device
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tokens_dir: str, num_steps: int):
    """configs/demo.py shrunk to a 4x4 grid of 64 codes, 4 classes, 2 blocks of width 32."""
    from lasadgen_jax.config_files import load_config

    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py"))
    config.model.update(grid=(4, 4), vocab_size=64, num_classes=4, dim=32, depth=2, num_heads=2,
                        class_dropout=0.1, token_dropout=0.1)
    config.data.tokens_dir = tokens_dir
    config.batch_size = 8
    config.num_steps = num_steps
    config.log_every = 1
    config.checkpoint.update(every_steps=4, keep=3)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=2)
    config.sample.update(every_steps=0, classes=(0, 1, 2, 3), per_class=2)
    return config


def losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["last_loss"] for line in f if line.strip()]


def run_meshes(workdir: str, tokens_dir: str) -> dict:
    import jax

    from lasadgen_jax import checkpoints, sharding, train, train_state
    from lasadgen_jax.model_io import model_config_from

    assert jax.device_count() == 8, f"wanted 8 fake CPU devices, got {jax.device_count()}"
    result = {}
    for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        config = tiny_config(tokens_dir, num_steps=2)
        config.model.depth = 1                   # compile time is most of this test
        config.optimizer.warmup_steps = 0        # so that step 2's loss follows a real update
        config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
        config.checkpoint.every_steps = 100
        name = "x".join(map(str, shape))
        devices = jax.devices()[: shape[0] * shape[1] * shape[2]]
        train.train(config, os.path.join(workdir, name), devices=devices)
        # The shardings the trainer gives the parameters, as the test checks them against the rules.
        model_config = model_config_from(config)
        mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
        setup = train_state.setup_training(config, model_config, mesh, 2)
        abstract, shardings = setup.abstract_state, setup.state_shardings
        manager = checkpoints.train_checkpoint_manager(os.path.join(workdir, name), config)
        restored = checkpoints.restore_checkpoint(manager, 2, abstract, shardings,
                                                  train.open_data(config, tokens_dir, model_config))
        w1 = restored["params"]["blocks"][0]["ffn"]["w1"]["kernel"]
        adam = restored["opt_state"][1][0]       # chain(clip, adamw): adamw's ScaleByAdamState
        result[name] = {"losses": losses(os.path.join(workdir, name)),
                        "w1_spec": [None if a is None else (list(a) if isinstance(a, tuple) else a)
                                    for a in w1.sharding.spec],
                        "w1_shard_shape": list(w1.addressable_shards[0].data.shape),
                        "adam_mu_w1_spec": [None if a is None else (list(a) if isinstance(a, tuple) else a)
                                            for a in adam.mu["blocks"][0]["ffn"]["w1"]["kernel"].sharding.spec]}
    return result


def multihost_config(tokens_dir: str, num_steps: int):
    """tiny_config with one block (compile time is most of these runs), a sample grid at the end."""
    config = tiny_config(tokens_dir, num_steps)
    config.model.depth = 1
    config.optimizer.warmup_steps = 0
    config.checkpoint.every_steps = 3
    config.sample.update(every_steps=num_steps, classes=(0, 1, 2, 3), per_class=2)
    return config


class HostsInOneIterator:
    """What `hosts` processes would each read (train.open_data with process index i of `hosts`),
    concatenated in process order: the global batch that make_array_from_process_local_data builds
    when process i holds the i-th block of devices. Checkpointable like a grain iterator."""

    def __init__(self, config, tokens_dir: str, model_config, hosts: int):
        from lasadgen_jax.data.pipeline import token_dataset, token_iterator

        self.iterators = [
            token_iterator(token_dataset(tokens_dir, grid=model_config.grid, codebook_size=model_config.vocab_size,
                                         batch_size=config.batch_size // hosts, seed=config.seed,
                                         shard_index=index, shard_count=hosts), num_workers=0,
                           read_threads=config.data.read_threads, prefetch_batches=config.data.prefetch_batches)
            for index in range(hosts)]

    def __next__(self):
        import numpy as np

        parts = [next(iterator) for iterator in self.iterators]
        return {key: np.concatenate([part[key] for part in parts]) for key in ("tokens", "label")}

    def get_state(self) -> bytes:   # grain's checkpoint handler stores bytes of non-grain iterators
        return json.dumps([iterator.get_state() for iterator in self.iterators]).encode()

    def set_state(self, state: bytes) -> None:
        for iterator, part in zip(self.iterators, json.loads(state)):
            iterator.set_state(part)

    def start_prefetch(self) -> None:
        pass


def run_reshard(workdir: str, tokens_dir: str) -> dict:
    """Losses of an 8-step run on mesh (8,1,1), and of its step-4 checkpoint resumed on (2,2,2) and on
    one device; the resumed runs' restored shardings of one ffn kernel."""
    import shutil

    import jax

    from lasadgen_jax import checkpoints, sharding, train, train_state
    from lasadgen_jax.model_io import model_config_from

    assert jax.device_count() == 8, f"wanted 8 fake CPU devices, got {jax.device_count()}"
    meshes = {"8x1x1": ((8, 1, 1), jax.devices()), "2x2x2": ((2, 2, 2), jax.devices()),
              "1x1x1": ((1, 1, 1), jax.devices()[:1])}

    def config_for(shape):
        config = multihost_config(tokens_dir, 8)
        config.sample.every_steps = 0
        config.checkpoint.every_steps = 4
        config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
        return config

    first = os.path.join(workdir, "8x1x1")
    shape, devices = meshes["8x1x1"]
    train.train(config_for(shape), first, devices=devices)
    result = {"8x1x1": {"losses": losses(first)}}
    for name in ("2x2x2", "1x1x1"):
        resumed = os.path.join(workdir, f"resumed_on_{name}")
        shutil.copytree(first, resumed)
        shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
        shutil.rmtree(os.path.join(resumed, "params_ema"))
        shape, devices = meshes[name]
        summary = train.train(config_for(shape), resumed, devices=devices)
        config = config_for(shape)
        model_config = model_config_from(config)
        setup = train_state.setup_training(config, model_config, sharding.make_mesh(config.mesh.to_dict(), devices), 8)
        restored = checkpoints.restore_checkpoint(checkpoints.train_checkpoint_manager(resumed, config), 8,
                                                  setup.abstract_state, setup.state_shardings,
                                                  train.open_data(config, tokens_dir, model_config))
        w1 = restored["params"]["blocks"][0]["ffn"]["w1"]["kernel"]
        result[name] = {"start_step": summary["start_step"], "losses": losses(resumed),
                        "w1_spec": [None if a is None else a for a in w1.sharding.spec],
                        "w1_devices": len(w1.sharding.device_set)}
    return result


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        from lasadgen_jax import train

        train.train(tiny_config(sys.argv[3], int(sys.argv[4])), sys.argv[2])
    elif mode == "meshes":
        print("RESULT " + json.dumps(run_meshes(sys.argv[2], sys.argv[3])))
    elif mode == "host":
        import jax

        from lasadgen_jax import train

        summary = train.train(multihost_config(sys.argv[3], int(sys.argv[4])), sys.argv[2])
        print("RESULT " + json.dumps({"process_index": jax.process_index(), **summary}), flush=True)
    elif mode == "hosts_in_one":
        from lasadgen_jax import train

        hosts = int(sys.argv[5])
        train.open_data = lambda config, tokens_dir, model_config: HostsInOneIterator(config, tokens_dir,
                                                                                      model_config, hosts)
        summary = train.train(multihost_config(sys.argv[3], int(sys.argv[4])), sys.argv[2])
        print("RESULT " + json.dumps(summary), flush=True)
    elif mode == "reshard":
        print("RESULT " + json.dumps(run_reshard(sys.argv[2], sys.argv[3])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
