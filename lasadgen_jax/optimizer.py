"""The optimizer of both trainers (LASADGen's and the small VQ's): optax AdamW on a pure dict of
parameters (the nnx state split from the model), after global-norm clipping, with a linear warmup
into a constant or cosine schedule. config.optimizer keys: learning_rate, b1, b2, eps, weight_decay,
grad_clip_norm, schedule ('constant' | 'cosine'), warmup_steps, end_learning_rate_fraction (cosine).
"""

from __future__ import annotations

import jax
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


def make_optimizer(optimizer: ml_collections.ConfigDict, num_steps: int):
    """(optax transformation, schedule): AdamW with decoupled weight decay on matrices only (LlamaGen:
    ndim >= 2), after global-norm clipping."""
    schedule = make_schedule(optimizer, num_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optimizer.grad_clip_norm),
        optax.adamw(schedule, b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                    weight_decay=optimizer.weight_decay,
                    mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)),
    )
    return tx, schedule
