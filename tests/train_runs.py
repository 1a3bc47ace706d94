"""Trainer runs that tests start as subprocesses (signals, fake devices): `python tests/train_runs.py MODE ...`.

    train  WORKDIR TOKENS NUM_STEPS           a tiny training run (killed or preempted by the test)
    meshes WORKDIR TOKENS                     with 8 fake CPU devices: the same steps on several meshes,
                                              printing one JSON line of losses and parameter shardings
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tokens_dir: str, num_steps: int):
    """configs/demo.py shrunk to a 4x4 grid of 64 codes, 4 classes, 2 blocks of width 32."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "demo", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config()
    config.model.update(grid=(4, 4), vocab_size=64, num_classes=4, dim=32, depth=2, num_heads=2,
                        class_dropout=0.1, token_dropout=0.1)
    config.data.prepare = None
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

    from lasadgen_jax import train

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
        model_config = train.model_config_from(config)
        mesh = train.sharding.make_mesh(config.mesh.to_dict(), devices)
        setup = train.setup_training(config, model_config, mesh, 2)
        abstract, shardings = setup.abstract_state, setup.state_shardings
        restored = train.restore_checkpoint(train.checkpoint_manager(os.path.join(workdir, name), config), 2,
                                            abstract, shardings, train.open_data(config, tokens_dir, model_config))
        w1 = restored["params"]["blocks"][0]["ffn"]["w1"]["kernel"]
        adam = restored["opt_state"][1][0]       # chain(clip, adamw): adamw's ScaleByAdamState
        result[name] = {"losses": losses(os.path.join(workdir, name)),
                        "w1_spec": [None if a is None else (list(a) if isinstance(a, tuple) else a) for a in w1.sharding.spec],
                        "w1_shard_shape": list(w1.addressable_shards[0].data.shape),
                        "adam_mu_w1_spec": [None if a is None else (list(a) if isinstance(a, tuple) else a)
                                            for a in adam.mu["blocks"][0]["ffn"]["w1"]["kernel"].sharding.spec]}
    return result


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        from lasadgen_jax import train

        train.train(tiny_config(sys.argv[3], int(sys.argv[4])), sys.argv[2])
    elif mode == "meshes":
        print("RESULT " + json.dumps(run_meshes(sys.argv[2], sys.argv[3])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
