"""Starting a model from another one's parameters (config.init_from, lasadgen_jax/linearize.py) and
freezing the non-attention parameters for the first updates (lasadgen_jax/optimizer.py)."""

from __future__ import annotations

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import write_synthetic_token_dir
from train_runs import tiny_config

from lasadgen_jax import linearize, train
from lasadgen_jax.model_io import model_config_from, save_params
from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig
from lasadgen_jax.optimizer import make_optimizer
from lasadgen_jax.train_state import init_params

SOFTMAX = ModelConfig(vocab_size=40, num_classes=3, grid=(3, 5), dim=32, depth=2, num_heads=2, attention="softmax",
                      class_dropout=0.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
FRESH_PER_BLOCK = {"2d": ("decay_col_theta", "decay_row_theta", "gate_proj/kernel", "out_norm_scale"),
                   "1d": ("decay_col_theta", "gate_proj/kernel", "out_norm_scale"),
                   "none": ("gate_proj/kernel", "out_norm_scale")}


def flat(tree) -> dict:
    return {name: np.asarray(leaf) for name, leaf in linearize.named_leaves(tree).items()}


@pytest.mark.parametrize("variant", ["2d", "1d", "none"])
def test_linearizing_copies_exactly_the_matching_tensors(variant):
    source = flat(init_params(SOFTMAX, seed=1))
    target = dataclasses.replace(SOFTMAX, attention=variant)
    fresh = flat(init_params(target, seed=2))
    params, transfer = linearize.transfer_params(init_params(SOFTMAX, seed=1), init_params(target, seed=2))
    result = flat(params)

    expected_fresh = {f"blocks/{b}/attention/{name}" for b in range(SOFTMAX.depth) for name in FRESH_PER_BLOCK[variant]}
    assert set(transfer.fresh) == expected_fresh and set(transfer.copied) == set(source)
    assert set(result) == set(fresh) == set(source) | expected_fresh
    for name, value in result.items():
        wanted = source[name] if name in source else fresh[name]
        np.testing.assert_array_equal(value, wanted, err_msg=name)
    assert f"{len(source)} parameters copied, {len(expected_fresh)} fresh" in transfer.summary()


def test_params_from_a_directory_and_its_model_json(tmp_path):
    source_model = LASADGen(SOFTMAX, rngs=nnx.Rngs(3))
    save_params(source_model, str(tmp_path / "run" / "params_ema"))
    target = dataclasses.replace(SOFTMAX, attention="2d")
    fresh = init_params(target, seed=0)
    params, transfer = linearize.params_from(str(tmp_path / "run"), fresh, target)   # a workdir: its params_ema
    source = flat(nnx.to_pure_dict(nnx.state(source_model, nnx.Param)))
    for name in transfer.copied:
        np.testing.assert_array_equal(flat(params)[name], source[name], err_msg=name)
    linearize.check_source(str(tmp_path / "run" / "params_ema"), target, fresh)

    other = dataclasses.replace(target, num_classes=5)
    with pytest.raises(ValueError, match=r"holds another model.*num_classes: source 3, model 5") as error:
        linearize.check_source(str(tmp_path / "run"), other, init_params(other, seed=0))
    assert "\n" not in str(error.value)


def test_a_source_that_does_not_fit_is_refused_naming_the_parameters():
    target = dataclasses.replace(SOFTMAX, attention="2d")
    fresh = init_params(target, seed=0)
    wider = init_params(dataclasses.replace(SOFTMAX, vocab_size=48), seed=0)
    with pytest.raises(ValueError, match=r"shapes differ \(source vs model\): head/kernel \(32, 48\) vs \(32, 40\), "
                                         r"token_embedding/embedding \(48, 32\) vs \(40, 32\)$") as error:
        linearize.transfer_params(wider, fresh)
    assert "\n" not in str(error.value)

    source = init_params(SOFTMAX, seed=0)
    source["extra"] = {"kernel": jnp.zeros((2, 2))}
    del source["head"]
    with pytest.raises(ValueError, match=r"only in the source: extra/kernel; missing from the source: head/kernel$"):
        linearize.transfer_params(source, fresh)
    # a 2d source has a row decay that a 1d model lacks
    with pytest.raises(ValueError, match=r"only in the source: blocks/0/attention/decay_row_theta, "):
        linearize.transfer_params(fresh, init_params(dataclasses.replace(SOFTMAX, attention="1d"), seed=0))


# ----------------------------------------------------------------------------- freezing


def toy_params():
    block = {"attention": {"q_proj": {"kernel": jnp.ones((4, 4))}, "out_norm_scale": jnp.ones((2, 2))},
             "attention_norm": {"scale": jnp.ones((4,))}, "ffn": {"w1": {"kernel": jnp.ones((4, 8))}}}
    return {"blocks": {0: block}, "head": {"kernel": jnp.ones((4, 3))}, "norm": {"scale": jnp.ones((4,))}}


def optimizer_settings():
    return ml_collections.ConfigDict(dict(learning_rate=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                                          grad_clip_norm=1.0, schedule="constant", warmup_steps=0,
                                          end_learning_rate_fraction=0.1))


def run_updates(tx, params, opt_state, steps, start=0):
    """`steps` AdamW updates with gradients drawn from the update index; every intermediate params tree."""
    history, update = [], jax.jit(tx.update)
    for index in range(start, start + steps):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(index), len(leaves))
        grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, opt_state


def test_non_attention_params_are_frozen_for_k_updates_then_move_and_a_resume_agrees():
    frozen_steps = 3
    tx, _ = make_optimizer(optimizer_settings(), 10, freeze_non_attention_steps=frozen_steps)
    params = toy_params()
    history, _ = run_updates(tx, params, tx.init(params), 5)
    start = flat(params)
    for index, step_params in enumerate(history):
        now = flat(step_params)
        for name in now:
            moved = not np.array_equal(now[name], start[name])
            trainable = "/attention/" in f"/{name}"
            assert moved == (trainable or index >= frozen_steps), (index, name)

    # the count is part of the optimizer state: two updates, a round trip through the host, three more
    first, opt_state = run_updates(tx, params, tx.init(params), 2)
    opt_state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), opt_state)
    rest, _ = run_updates(tx, first[-1], opt_state, 3, start=2)
    chex.assert_trees_all_equal(rest[-1], history[-1])


def test_no_freezing_keeps_the_optimizer_state_of_existing_checkpoints():
    tx, _ = make_optimizer(optimizer_settings(), 10)
    tx_frozen, _ = make_optimizer(optimizer_settings(), 10, freeze_non_attention_steps=1)
    params = toy_params()
    assert len(tx.init(params)) == 2 and len(tx_frozen.init(params)) == 4   # chain(clip, adamw) as before
    with pytest.raises(ValueError, match="freeze_non_attention_steps must be >= 0"):
        make_optimizer(optimizer_settings(), 10, freeze_non_attention_steps=-1)


# ----------------------------------------------------------------------------- the trainer


def test_the_trainer_starts_from_init_from_and_a_resume_does_not_read_it_again(tmp_path, capsys):
    tokens_dir = write_synthetic_token_dir(str(tmp_path / "tokens"))
    source_config = tiny_config(tokens_dir, 1)
    source_config.model.update(depth=1, attention="softmax")
    source_dir = str(tmp_path / "softmax_params")
    save_params(LASADGen(model_config_from(source_config), rngs=nnx.Rngs(5)), source_dir)

    config = tiny_config(tokens_dir, 1)
    config.model.depth = 1
    config.checkpoint.every_steps = 1
    config.init_from = source_dir
    config.freeze_non_attention_steps = 1
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    assert "init_from" in capsys.readouterr().out

    # resumed at its last step with init_from gone: nothing re-initialised, nothing read
    os.rename(source_dir, source_dir + "_moved")
    summary = train.train(config, workdir)
    assert summary["start_step"] == 1 and "init_from" not in capsys.readouterr().out

    # a fresh workdir with the source gone is refused before anything is written
    with pytest.raises(ValueError, match="config.init_from .* is not a directory"):
        train.train(config, str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other" / "run.json")


def test_the_linearize_config_refuses_to_run_without_init_from():
    from lasadgen_jax.config_files import load_config
    from lasadgen_jax.train_config import check_config

    config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                      "linearize.py") + ":base=ablation,attention=1d")
    config.data.tokens_dir = "tokens"
    assert config.model.attention == "1d" and config.freeze_non_attention_steps > 0
    with pytest.raises(ValueError, match=r"config.freeze_non_attention_steps=20 .* set config.init_from"):
        check_config(config)
    config.init_from = "softmax_params"
    check_config(config)
