"""Train the small VQ tokenizer on Fashion-MNIST (reconstruction + codebook + commitment losses).

    python -m lasadgen_jax.tokenizer.train --config=configs/vq_small.py --workdir=workdirs/vq_small

Writes into the workdir: `checkpoints/` (Orbax, atomic, checksummed; a re-run resumes from the newest
intact one),
`reconstructions/step_NNNNNN.png` (test originals above their reconstructions) at each checkpoint,
`tokenizer/` (the tokenizer directory that token extraction takes) and `metrics.json` at the end,
when PSNR and codebook usage on the test split are also printed. A step whose loss or updated state
is not finite is skipped; config.max_consecutive_skips in a row end the run. Single-process; LPIPS
and the GAN loss of LlamaGen's recipe are left out (their weights cannot be fetched offline).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import flags
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from lasadgen_jax import cli
from lasadgen_jax.checkpoints import checkpoint_manager, close_manager, finish_saves, restore_newest_good, save_items
from lasadgen_jax.data.fashion_mnist import load_fashion_mnist
from lasadgen_jax.optimizer import make_optimizer
from lasadgen_jax.tokenizer import evaluation
from lasadgen_jax.tokenizer.architecture import VQArchitecture
from lasadgen_jax.tokenizer.checkpoint import save_tokenizer
from lasadgen_jax.tokenizer.model import create_vq_model
from lasadgen_jax.train_config import check_optimizer_config
from lasadgen_jax.train_state import SkippedSteps, all_finite
from lasadgen_jax.workdir import WorkdirLock, claim_workdir

RUN_FILE = "vq_run.json"
RUN_KIND = "lasadgen_jax.tokenizer.train"
LOG_EVERY = 10  # steps between progress-bar metrics (each one waits for the device)
RECONSTRUCTION_LOSSES = {"mse": lambda x: x**2, "l1": jnp.abs}


# ---------------------------------------------------------------- workdir and data


def claim_vq_workdir(workdir: str, arch: VQArchitecture) -> None:
    """Refuse a workdir that holds anything but a run of this same architecture; then mark it as ours."""
    claim_workdir(workdir, RUN_KIND, json.loads(arch.to_json()), run_file=RUN_FILE, identity_key="architecture")


def check_vq_config(config: ml_collections.ConfigDict) -> None:
    """Refuse settings the tokenizer trainer cannot honour, naming the config key, before anything is written."""
    check_optimizer_config(config.optimizer)
    if config.loss.reconstruction not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"config.loss.reconstruction {config.loss.reconstruction!r} unknown; "
                         f"known: {sorted(RECONSTRUCTION_LOSSES)}")
    for key in ("batch_size", "num_steps", "checkpoint_every", "keep_checkpoints", "max_consecutive_skips"):
        if config[key] < 1:
            raise ValueError(f"config.{key} must be >= 1, got {config[key]}")


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


# ---------------------------------------------------------------- train state and step


def initial_state(params: dict, tx) -> dict:
    """The train state: step, params (a pure dict split from the model), optimizer state."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def make_train_step(graphdef, rest, tx, loss_config: ml_collections.ConfigDict):
    """One jitted step (the state donated): reconstruction + codebook + commitment losses, AdamW; the old
    state is kept (metrics["finite"] False) unless the loss and the updated params and optimizer state
    are all finite."""
    if loss_config.reconstruction not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"config.loss.reconstruction {loss_config.reconstruction!r} unknown; "
                         f"known: {sorted(RECONSTRUCTION_LOSSES)}")
    pointwise = RECONSTRUCTION_LOSSES[loss_config.reconstruction]
    codebook_weight, commitment_beta = loss_config.codebook_weight, loss_config.commitment_beta

    def loss_fn(params, images):
        reconstruction, _, codebook_loss, commitment_loss = nnx.merge(graphdef, params, rest)(images)
        reconstruction_loss = jnp.mean(pointwise(reconstruction - images))
        total = reconstruction_loss + codebook_weight * codebook_loss + commitment_beta * commitment_loss
        mse = jnp.mean((jnp.clip(reconstruction, -1, 1) - images) ** 2)
        return total, dict(loss=total, reconstruction=reconstruction_loss, codebook=codebook_loss,
                           commitment=commitment_loss, psnr=10 * jnp.log10(4.0 / mse))

    def train_step(state, images_uint8):
        images = to_model_range(images_uint8)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], images)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(metrics["loss"]) & all_finite((params, opt_state))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                     "opt_state": keep(opt_state, state["opt_state"])}
        return new_state, {**metrics, "finite": finite}

    return jax.jit(train_step, donate_argnums=0)


@nnx.jit
def reconstruct(model, images_uint8):
    codes = model.encode(to_model_range(images_uint8))
    return codes, model.decode(codes)


# ---------------------------------------------------------------- checkpoints


def restore_latest(manager: ocp.CheckpointManager, state: dict) -> tuple[dict, int]:
    """(the newest intact checkpoint's train state, its step), or (state, 0) when there is none; damaged
    ones are reported and moved aside (checkpoints.restore_newest_good)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

    def restore_step(step):
        try:
            return manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError) as error:
            raise ValueError(f"checkpoint {manager.directory}/{step} does not fit this model and config: "
                             f"{error}") from None

    restored = restore_newest_good(manager, restore_step)
    return (state, 0) if restored is None else (restored[0], int(restored[1]))


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
    """Train (resuming from the workdir's newest intact checkpoint), export the tokenizer, return final
    metrics. Every refusal comes before anything is written; the workdir is locked while the run lasts."""
    check_vq_config(config)
    arch = VQArchitecture.from_dict(dict(config.model))
    train_images, eval_images = load_training_data(config)
    claim_vq_workdir(workdir, arch)
    with WorkdirLock(workdir, RUN_KIND):
        manager = checkpoint_manager(workdir, keep=config.keep_checkpoints)
        try:
            return train_in_workdir(config, workdir, arch, train_images, eval_images, manager)
        finally:   # also on an exception: the in-flight save is finished, not abandoned
            close_manager(manager)


def train_in_workdir(config, workdir: str, arch: VQArchitecture, train_images, eval_images, manager) -> dict:
    preview_images = eval_images[: config.reconstruction_images]
    graphdef, params, rest = nnx.split(create_vq_model(arch, seed=config.seed), nnx.Param, ...)
    tx, _ = make_optimizer(config.optimizer, config.num_steps)
    train_step = make_train_step(graphdef, rest, tx, config.loss)
    state, start_step = restore_latest(manager, initial_state(nnx.to_pure_dict(params), tx))

    def model_of(state):   # the VQModel of a train state, valid until the next step (which donates the state)
        return nnx.merge(graphdef, state["params"], rest)

    if start_step:
        print(f"resuming from step {start_step} of {config.num_steps}")

    started = time.time()
    progress = tqdm(range(start_step, config.num_steps), initial=start_step, total=config.num_steps, desc="vq",
                    unit="step")
    skipped = SkippedSteps(config.max_consecutive_skips)
    for step in progress:
        images = train_images[batch_indices(config.seed, step, len(train_images), config.batch_size)]
        state, metrics = train_step(state, jnp.asarray(images))
        done = step + 1
        skipped.add(done, metrics["finite"])
        if done % LOG_EVERY == 0 or done == config.num_steps:
            progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", psnr=f"{float(metrics['psnr']):.2f}",
                                 skipped=len(skipped.run))
        if done % config.checkpoint_every == 0 or done == config.num_steps:
            skipped.flush()
            save_items(manager, done, ocp.args.StandardSave(state), state, force=True)
            save_reconstructions(model_of(state), preview_images, workdir, done, config.batch_size)
    progress.close()
    skipped.flush()
    finish_saves(manager)
    train_seconds = time.time() - started

    model = model_of(state)
    codes, reconstructions = evaluate(model, eval_images, config.batch_size)
    usage, perplexity = evaluation.codebook_usage(codes, arch.codebook_size)
    result = dict(steps=config.num_steps, trained_steps_this_run=config.num_steps - start_step,
                  train_seconds_this_run=round(train_seconds, 1), eval_images=len(eval_images),
                  psnr_db=round(evaluation.psnr(eval_images, reconstructions), 3),
                  codebook_usage=round(usage, 4), codebook_perplexity=round(perplexity, 1),
                  tokenizer_hash=save_tokenizer(model, os.path.join(workdir, "tokenizer"),
                                                 image_size=eval_images.shape[1]),
                  png=save_reconstructions(model, preview_images, workdir, config.num_steps, config.batch_size))
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"test PSNR {result['psnr_db']:.2f} dB over {len(eval_images)} images; codebook usage "
          f"{100 * usage:.1f}% of {arch.codebook_size} (perplexity {perplexity:.0f}); "
          f"tokenizer in {os.path.join(workdir, 'tokenizer')}; reconstructions {result['png']}")
    return result


def main(argv):
    del argv
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. configs/vq_small.py",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, PNGs and the exported tokenizer go")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
