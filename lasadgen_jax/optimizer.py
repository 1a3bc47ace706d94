"""The optimizer of both trainers (LASADGen's and the small VQ's): optax AdamW on a pure dict of
parameters (the nnx state split from the model), after global-norm clipping, with a linear warmup
into a constant or cosine schedule. config.optimizer keys: learning_rate, b1, b2, eps, weight_decay,
grad_clip_norm, schedule ('constant' | 'cosine'), warmup_steps, end_learning_rate_fraction (cosine).

`freeze_non_attention_steps` K > 0 (the trainer's config.freeze_non_attention_steps, for a model
started from another one's parameters: linearize.py) holds every parameter outside the attention
blocks still for the first K optimizer updates: their gradients are zeroed before clipping (so the
global norm is the attention's alone, and Adam's moments of the frozen parameters stay zero) and
their updates, weight decay included, are zeroed after AdamW. The step count lives in the optimizer
state, so a resumed run freezes exactly the same updates; K = 0 leaves the transformation (and the
optimizer state's tree, i.e. existing checkpoints) as without the option.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(optimizer: ml_collections.ConfigDict, num_steps: int):
    """Learning rate by optimizer update: 0 -> learning_rate over warmup_steps, then constant or a cosine
    decay to end_learning_rate_fraction x learning_rate at num_steps."""
    warmup = optax.linear_schedule(0.0, optimizer.learning_rate, max(optimizer.warmup_steps, 1))
    if optimizer.schedule == "constant":
        main = optax.constant_schedule(optimizer.learning_rate)
    else:
        main = optax.cosine_decay_schedule(optimizer.learning_rate, max(num_steps - optimizer.warmup_steps, 1),
                                           alpha=optimizer.end_learning_rate_fraction)
    if optimizer.warmup_steps <= 0:
        return main
    return optax.join_schedules([warmup, main], [optimizer.warmup_steps])


def is_attention_param(path) -> bool:
    """Whether a parameter path lies inside an attention block (blocks/<i>/attention/...; not the
    attention_norm in front of it)."""
    return any(getattr(key, "key", None) == "attention" for key in path)


class FreezeState(NamedTuple):
    count: jax.Array   # updates seen so far (int32)


def zero_frozen_until(num_steps: int, trainable) -> optax.GradientTransformation:
    """Zeroes the updates of the parameters for which trainable(path) is False during the first
    num_steps updates this transformation sees; passes everything through afterwards."""
    def init_fn(params):
        del params
        return FreezeState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        frozen = state.count < num_steps
        updates = jax.tree_util.tree_map_with_path(
            lambda path, u: u if trainable(path) else jnp.where(frozen, jnp.zeros_like(u), u), updates)
        return updates, FreezeState(optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(optimizer: ml_collections.ConfigDict, num_steps: int, freeze_non_attention_steps: int = 0):
    """(optax transformation, schedule): AdamW with decoupled weight decay on matrices only (LlamaGen:
    ndim >= 2), after global-norm clipping; with freeze_non_attention_steps > 0, only attention
    parameters move in the first that many updates (module docstring)."""
    if freeze_non_attention_steps < 0:
        raise ValueError(f"config.freeze_non_attention_steps must be >= 0, got {freeze_non_attention_steps}")
    schedule = make_schedule(optimizer, num_steps)
    adamw = [optax.clip_by_global_norm(optimizer.grad_clip_norm),
             optax.adamw(schedule, b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                         weight_decay=optimizer.weight_decay,
                         mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))]
    if freeze_non_attention_steps == 0:
        return optax.chain(*adamw), schedule
    freeze = lambda: zero_frozen_until(freeze_non_attention_steps, is_attention_param)
    return optax.chain(freeze(), *adamw, freeze()), schedule
