"""Train the small VQ tokenizer on Fashion-MNIST (reconstruction + codebook + commitment losses).

    python -m lasadgen_jax.tokenizer.train --config=configs/vq_small.py --workdir=workdirs/vq_small

Writes into the workdir: `checkpoints/` (Orbax, atomic; a re-run resumes from the latest),
`reconstructions/step_NNNNNN.png` (test originals above their reconstructions) at each checkpoint,
`tokenizer/` (the tokenizer directory that token extraction takes) and `metrics.json` at the end,
when PSNR and codebook usage on the test split are also printed. Single-process; LPIPS and the GAN
loss of LlamaGen's recipe are left out (their weights cannot be fetched offline).
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from lasadgen_jax.data.fashion_mnist import load_fashion_mnist
from lasadgen_jax.tokenizer import evaluation
from lasadgen_jax.tokenizer.architecture import VQArchitecture
from lasadgen_jax.tokenizer.checkpoint import save_tokenizer
from lasadgen_jax.tokenizer.model import VQModel, create_vq_model

RUN_FILE = "vq_run.json"
RUN_KIND = "lasadgen_jax.tokenizer.train"
LOG_EVERY = 10  # steps between progress-bar metrics (each one waits for the device)
RECONSTRUCTION_LOSSES = {"mse": lambda x: x**2, "l1": jnp.abs}


# ---------------------------------------------------------------- workdir and data


def claim_workdir(workdir: str, arch: VQArchitecture) -> None:
    """Refuse a workdir that holds anything but a run of this same architecture; then mark it as ours."""
    run_file = os.path.join(workdir, RUN_FILE)
    if os.path.isfile(run_file):
        with open(run_file) as f:
            run = json.load(f)
        if run.get("kind") != RUN_KIND or run.get("architecture") != json.loads(arch.to_json()):
            raise ValueError(f"--workdir {workdir!r} holds another model's run ({run_file}: {run}); "
                             f"use a fresh workdir, this one is not overwritten")
        return
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise ValueError(f"--workdir {workdir!r} is not empty and holds no {RUN_FILE}: refusing to write into it")
    os.makedirs(workdir, exist_ok=True)
    with open(run_file + ".tmp", "w") as f:
        json.dump({"kind": RUN_KIND, "architecture": json.loads(arch.to_json())}, f, indent=1)
    os.replace(run_file + ".tmp", run_file)


def load_training_data(config: ml_collections.ConfigDict):
    """(train images uint8 [N, 32, 32, 3], test images uint8 [M, 32, 32, 3]) of the configured dataset."""
    if config.data.dataset != "fashion_mnist":
        raise ValueError(f"config.data.dataset {config.data.dataset!r} is not supported; known: fashion_mnist")
    train_images, _ = load_fashion_mnist("train", config.data.fashion_mnist_root)
    test_images, _ = load_fashion_mnist("test", config.data.fashion_mnist_root, count=config.data.eval_images)
    return train_images, test_images


def batch_indices(seed: int, step: int, dataset_size: int, batch_size: int) -> np.ndarray:
    """The images of one step: a pure function of (seed, step), so a resumed run sees the same batches."""
    return np.random.default_rng([seed, step]).integers(0, dataset_size, batch_size)


def to_model_range(images_uint8):
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


# ---------------------------------------------------------------- model, optimizer, step


def make_optimizer(model: VQModel, config: ml_collections.ConfigDict) -> nnx.Optimizer:
    opt = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, opt.warmup_steps, max(config.num_steps, opt.warmup_steps + 1),
        end_value=opt.learning_rate * opt.end_learning_rate_fraction)
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm),
                     optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def make_train_step(loss_config: ml_collections.ConfigDict):
    if loss_config.reconstruction not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"config.loss.reconstruction {loss_config.reconstruction!r} unknown; "
                         f"known: {sorted(RECONSTRUCTION_LOSSES)}")
    return cached_train_step(loss_config.reconstruction, loss_config.codebook_weight, loss_config.commitment_beta)


@functools.lru_cache(maxsize=None)
def cached_train_step(reconstruction_loss_name: str, codebook_weight: float, commitment_beta: float):
    """One jitted step per loss setting, so runs in one process (resume, tests) share compilations."""
    pointwise = RECONSTRUCTION_LOSSES[reconstruction_loss_name]

    def loss_fn(model, images):
        reconstruction, _, codebook_loss, commitment_loss = model(images)
        reconstruction_loss = jnp.mean(pointwise(reconstruction - images))
        total = reconstruction_loss + codebook_weight * codebook_loss + commitment_beta * commitment_loss
        mse = jnp.mean((jnp.clip(reconstruction, -1, 1) - images) ** 2)
        return total, dict(loss=total, reconstruction=reconstruction_loss, codebook=codebook_loss,
                           commitment=commitment_loss, psnr=10 * jnp.log10(4.0 / mse))

    @nnx.jit
    def train_step(model, optimizer, images_uint8):
        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, to_model_range(images_uint8))
        optimizer.update(model, grads)
        return metrics

    return train_step


@nnx.jit
def reconstruct(model, images_uint8):
    codes = model.encode(to_model_range(images_uint8))
    return codes, model.decode(codes)


# ---------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def training_state(model, optimizer) -> dict:
    return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)), "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}


def restore_latest(manager: ocp.CheckpointManager, model, optimizer) -> int:
    """Load the latest checkpoint into model and optimizer; the step to continue from (0 if none)."""
    step = manager.latest_step()
    if step is None:
        return 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, training_state(model, optimizer))
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    params, optimizer_state = nnx.state(model, nnx.Param), nnx.state(optimizer)
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(optimizer_state, restored["optimizer"])
    nnx.update(model, params)
    nnx.update(optimizer, optimizer_state)
    return int(step)


# ---------------------------------------------------------------- evaluation


def evaluate(model, images_uint8, batch_size: int):
    """(codes [N, h, w], reconstructions uint8 [N, H, W, C]) of every image, in batches of one shape
    (the last one padded) so that evaluation compiles once."""
    codes, reconstructions = [], []
    for start in range(0, len(images_uint8), batch_size):
        batch = images_uint8[start:start + batch_size]
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)])
        batch_codes, batch_images = reconstruct(model, jnp.asarray(padded))
        codes.append(np.asarray(batch_codes)[: len(batch)])
        reconstructions.append(evaluation.to_uint8(batch_images)[: len(batch)])
    return np.concatenate(codes), np.concatenate(reconstructions)


def save_reconstructions(model, images_uint8, workdir: str, step: int, batch_size: int) -> str:
    _, reconstructions = evaluate(model, images_uint8, batch_size)
    path = os.path.join(workdir, "reconstructions", f"step_{step:06d}.png")
    evaluation.save_comparison_png(images_uint8, reconstructions, path)
    return path


# ---------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming from the workdir's latest checkpoint), export the tokenizer, return final metrics."""
    arch = VQArchitecture.from_dict(dict(config.model))
    claim_workdir(workdir, arch)
    train_images, eval_images = load_training_data(config)
    preview_images = eval_images[: config.reconstruction_images]

    model = create_vq_model(arch, seed=config.seed)
    optimizer = make_optimizer(model, config)
    train_step = make_train_step(config.loss)
    manager = checkpoint_manager(workdir, config)
    start_step = restore_latest(manager, model, optimizer)
    if start_step:
        print(f"resuming from step {start_step} of {config.num_steps}")

    started = time.time()
    progress = tqdm(range(start_step, config.num_steps), initial=start_step, total=config.num_steps, desc="vq", unit="step")
    metrics = None
    for step in progress:
        images = train_images[batch_indices(config.seed, step, len(train_images), config.batch_size)]
        metrics = train_step(model, optimizer, jnp.asarray(images))
        done = step + 1
        if done % LOG_EVERY == 0 or done == config.num_steps:
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"non-finite loss by step {done} (last checked at step "
                                         f"{max(start_step, done - LOG_EVERY)}): {jax.device_get(metrics)}")
            progress.set_postfix(loss=f"{loss:.4f}", psnr=f"{float(metrics['psnr']):.2f}")
        if done % config.checkpoint_every == 0 or done == config.num_steps:
            manager.save(done, args=ocp.args.StandardSave(training_state(model, optimizer)))
            save_reconstructions(model, preview_images, workdir, done, config.batch_size)
    progress.close()
    manager.wait_until_finished()
    train_seconds = time.time() - started

    codes, reconstructions = evaluate(model, eval_images, config.batch_size)
    usage, perplexity = evaluation.codebook_usage(codes, arch.codebook_size)
    result = dict(steps=config.num_steps, trained_steps_this_run=config.num_steps - start_step,
                  train_seconds_this_run=round(train_seconds, 1), eval_images=len(eval_images),
                  psnr_db=round(evaluation.psnr(eval_images, reconstructions), 3),
                  codebook_usage=round(usage, 4), codebook_perplexity=round(perplexity, 1),
                  tokenizer_hash=save_tokenizer(model, os.path.join(workdir, "tokenizer")),
                  png=save_reconstructions(model, preview_images, workdir, config.num_steps, config.batch_size))
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"test PSNR {result['psnr_db']:.2f} dB over {len(eval_images)} images; codebook usage "
          f"{100 * usage:.1f}% of {arch.codebook_size} (perplexity {perplexity:.0f}); "
          f"tokenizer in {os.path.join(workdir, 'tokenizer')}; reconstructions {result['png']}")
    return result


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO, burying the progress bar
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. configs/vq_small.py", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, PNGs and the exported tokenizer go")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
