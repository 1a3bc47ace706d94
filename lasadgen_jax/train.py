"""Train LASADGen on VQ token shards: sharded over a (data, fsdp, tensor) mesh, checkpointed with Orbax.

    python -m lasadgen_jax.train --config=configs/imagenet256.py --workdir=DIR --config.data.tokens_dir=TOKENS

The workdir holds run.json (the model config that owns it), checkpoints/ (Orbax; the train state and
the data iterator's position, saved together), metrics.jsonl, tensorboard/, samples/ (PNG grids from
the EMA parameters) and, at the end, params_ema/ (what `python -m lasadgen_jax.sample --ckpt` reads).
Starting again in the same workdir resumes from the newest intact checkpoint at exactly the next batch
(each checkpoint carries checksums.json; a damaged one is named and moved to damaged_checkpoints/);
SIGTERM (preemption) saves a checkpoint and exits cleanly (with several processes, at one step that
JAX's preemption service agrees on). While it runs, WORKDIR/lock refuses a second trainer (local
workdirs). A step with a non-finite loss or update is skipped; config.max_consecutive_skips in a row
end the run (exit 3). The workdir may be gs://... (etils.epath and Orbax; docs/training.md, "Scaling
out"); launch/ starts the processes of a multi-host run.

Sections: workdir -> data -> logging, samples and evals -> the loop. The config checks are in
train_config.py, the train state and the jitted step in train_state.py, checkpoints in checkpoints.py.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from lasadgen_jax import linearize, sharding
from lasadgen_jax.checkpoints import (
    PreemptionFlag,
    close_manager,
    finish_saves,
    restore_latest_train_state,
    save_checkpoint,
    train_checkpoint_manager,
)
from lasadgen_jax.distributed import maybe_initialize_distributed
from lasadgen_jax.eval.features import FeatureExtractor
from lasadgen_jax.eval.reference import load_reference
from lasadgen_jax.eval.scores import parse_metrics, sample_and_evaluate
from lasadgen_jax.flops import peak_flops_per_device, train_flops_per_token
from lasadgen_jax.metric_writer import MetricWriter
from lasadgen_jax.model_io import load_tokenizer_for, model_config_from, model_identity, save_params
from lasadgen_jax.models.lasadgen import ModelConfig
from lasadgen_jax.sample import SamplingConfig, decode_to_uint8, generate, tile, token_grid_picture
from lasadgen_jax.train_config import (
    check_batch_fits_mesh,
    check_config,
    check_eval_config,
    check_sample_config,
    check_tokens_fit_model,
    num_training_steps,
    resolve_workdir,
)
from lasadgen_jax.train_state import SkippedSteps, describe_memory, init_params, seeded_rng_state, setup_training
from lasadgen_jax.workdir import WorkdirLock, check_locations, claim_workdir, workdir_path, write_bytes_atomically

RUN_KIND = "lasadgen_jax.train"


# ============================================================================= workdir


def claim_train_workdir(workdir: str, model_config: ModelConfig, config: ml_collections.ConfigDict) -> None:
    """Refuse a workdir of another model (or of something else, or with foreign checkpoints/); else write
    its run.json: this model's identity and the whole config."""
    claim_workdir(workdir, RUN_KIND, model_identity(model_config), foreign_marker="checkpoints",
                  extra={"config": json.loads(config.to_json_best_effort())})


def check_metrics_without_checkpoint(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuse to start from step 0 in a workdir whose checkpoints are gone but whose metrics.jsonl logs
    steps by which a checkpoint had surely been written (the first save is complete once the second
    starts): restarting would silently repeat them."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    if steps and max(steps) >= 2 * config.checkpoint.every_steps:
        raise ValueError(f"{workdir}/checkpoints holds no checkpoint, but {path} logs steps up to {max(steps)}: "
                         f"the checkpoints were removed or lost; restore them, or move metrics.jsonl aside to "
                         f"train again from step 0")


def holds_checkpoints(workdir: str) -> bool:
    """Whether WORKDIR/checkpoints has a step directory (a run to resume rather than to start)."""
    directory = epath.Path(workdir) / "checkpoints"
    return directory.is_dir() and any(path.name.isdigit() for path in directory.iterdir())


def initial_train_state(setup, config, model_config: ModelConfig, is_main: bool) -> dict:
    """The state of a run that starts (nothing to resume): config.init_from's parameters where set
    (linearize.py: copied where name and shape match, the LASAD-only ones fresh), else fresh ones."""
    if config.init_from is None:
        return setup.initial_state(model_config, config.seed)
    params, transfer = linearize.params_from(config.init_from, init_params(model_config, config.seed), model_config)
    if is_main:
        print(transfer.summary(), flush=True)
    return setup.state_from_params(params)


# ============================================================================= data


def open_data(config, tokens_dir: str, model_config: ModelConfig):
    """The checkpointable iterator over this process's batches ({"tokens", "label"} numpy)."""
    # grain (and its worker machinery) loads only where data is read
    from lasadgen_jax.data.pipeline import token_dataset, token_iterator

    dataset = token_dataset(tokens_dir, grid=model_config.grid, codebook_size=model_config.vocab_size,
                            batch_size=config.batch_size // jax.process_count(), seed=config.seed,
                            skip_corrupt_records=config.data.skip_corrupt_records)
    return token_iterator(dataset, num_workers=config.data.num_workers, read_threads=config.data.read_threads,
                          prefetch_batches=config.data.prefetch_batches)


def global_batch(local: dict, mesh) -> tuple[jax.Array, jax.Array]:
    """(tokens [B, N], labels [B]) as global arrays split over data x fsdp, from each process's part."""
    batch_sharding = sharding.batch_sharding(mesh)
    tokens = jax.make_array_from_process_local_data(batch_sharding, np.asarray(local["tokens"], np.int32))
    labels = jax.make_array_from_process_local_data(batch_sharding, np.asarray(local["label"], np.int32))
    return tokens, labels


# ============================================================================= logging, samples and evals


def sample_grid(graphdef, rng_state_template, ema_params, config, model_config: ModelConfig, tokenizer, step: int):
    """A uint8 picture of samples from the EMA parameters: one row per configured class."""
    model = nnx.merge(graphdef, ema_params, seeded_rng_state(rng_state_template, jax.random.key(0)))
    model.eval()
    classes = list(config.sample.classes)
    labels = np.repeat(np.asarray(classes, np.int32), config.sample.per_class)
    sampling = SamplingConfig(cfg_scale=config.sample.cfg_scale, temperature=config.sample.temperature,
                              top_k=config.sample.top_k, top_p=config.sample.top_p)
    tokens = generate(model, labels, jax.random.fold_in(jax.random.key(config.seed + 7), step), sampling)
    if not tokens.is_fully_addressable:
        tokens = multihost_utils.process_allgather(tokens, tiled=True)
    tokens = np.asarray(tokens)
    if tokenizer is None:
        return token_grid_picture(tokens, model_config.vocab_size, columns=config.sample.per_class)
    return tile(decode_to_uint8(tokenizer, tokens, batch_size=len(tokens)), columns=config.sample.per_class)


def write_sample_grid(picture: np.ndarray, workdir: str, step: int, writer: MetricWriter) -> str | None:
    if jax.process_index() != 0:
        return None
    directory = epath.Path(workdir) / "samples"
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    path = directory / f"step_{step:07d}.png"
    write_bytes_atomically(path, buffer.getvalue())
    writer.write_image(step, "samples/ema", picture)
    return str(path)


EVAL_SCALARS = ("fid", "sfid", "inception_score", "precision", "recall")


def make_evaluator(evaluation: ml_collections.ConfigDict, workdir: str, tokenizer_dir: str | None) -> dict:
    """The Inception feature extractor and reference statistics, built once for the periodic evals."""
    if tokenizer_dir is None:
        raise ValueError("config.eval.every_steps needs config.tokenizer_dir to decode samples into images")
    metrics, _ = parse_metrics(evaluation.metrics)
    extractor = FeatureExtractor(os.path.expanduser(evaluation.inception), batch_size=evaluation.feature_batch_size)
    cache_dir = os.path.join(workdir, "eval_cache")
    reference = load_reference(evaluation.reference, extractor, cache_dir,
                               with_radii="precision" in metrics or "recall" in metrics,
                               fashion_mnist_root=evaluation.fashion_mnist_root)
    return {"extractor": extractor, "reference": reference, "metrics": metrics}


def evaluate_ema(evaluator: dict, graphdef, rng_state_template, ema_params, tokenizer, config, step: int) -> dict:
    """FID etc. of config.eval.num_samples images sampled from the EMA parameters (labels cycle the classes)."""
    model = nnx.merge(graphdef, ema_params, seeded_rng_state(rng_state_template, jax.random.key(0)))
    model.eval()
    sampling = SamplingConfig(cfg_scale=config.eval.cfg_scale, temperature=config.sample.temperature,
                              top_k=config.sample.top_k, top_p=config.sample.top_p)
    return sample_and_evaluate(model, tokenizer, evaluator["reference"], evaluator["extractor"],
                               config.eval.num_samples, jax.random.PRNGKey(config.seed + 11 + step), sampling,
                               batch_size=config.eval.batch_size, metrics=evaluator["metrics"], progress=False)


def export_params(graphdef, rng_state_template, params, workdir: str) -> None:
    """The (EMA) parameters as WORKDIR/params_ema with its model.json (model_io.save_params), for
    `sample --ckpt=WORKDIR` without --config; every process takes part, and an earlier export is replaced."""
    model = nnx.merge(graphdef, params, seeded_rng_state(rng_state_template, jax.random.key(0)))
    save_params(model, workdir_path(workdir, "params_ema"), force=True)


# ============================================================================= the loop


def train(config: ml_collections.ConfigDict, workdir: str | None = None, *, devices=None) -> dict:
    """Train (resuming from the workdir's latest intact checkpoint); returns a summary of the run.

    devices: the devices of the mesh (default: all of them).
    """
    # ---- config, distributed set-up, data, workdir: every refusal before anything is written
    maybe_initialize_distributed(config.distributed)
    check_config(config)
    model_config = model_config_from(config)
    check_sample_config(config.sample, model_config)
    check_eval_config(config.eval, config.tokenizer_dir is not None)
    workdir = resolve_workdir(workdir, config)
    check_locations(config, workdir)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    check_batch_fits_mesh(config, mesh)
    manifest = check_tokens_fit_model(config.data.tokens_dir, model_config)
    num_steps = num_training_steps(config, manifest)
    iterator = open_data(config, config.data.tokens_dir, model_config)
    setup = setup_training(config, model_config, mesh, num_steps)
    if config.init_from is not None and not holds_checkpoints(workdir):
        linearize.check_source(config.init_from, model_config, setup.abstract_state["params"])
    claim_train_workdir(workdir, model_config, config)
    with WorkdirLock(workdir, RUN_KIND):
        return train_in_workdir(config, workdir, model_config, mesh, setup, iterator, num_steps)


def train_in_workdir(config, workdir: str, model_config: ModelConfig, mesh, setup, iterator, num_steps: int) -> dict:
    """The run in a claimed and locked workdir: restore, the loop, the export. On any exception the
    in-flight checkpoint save is finished before the exception goes on."""
    manager = train_checkpoint_manager(workdir, config)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    try:
        return train_loop(config, workdir, model_config, mesh, setup, iterator, num_steps, manager, writer)
    finally:
        try:
            close_manager(manager)
        finally:
            writer.close()


def train_loop(config, workdir: str, model_config: ModelConfig, mesh, setup, iterator, num_steps: int, manager,
               writer: MetricWriter) -> dict:
    is_main = jax.process_index() == 0
    graphdef, rng_state_template = setup.graphdef, setup.rng_state_template
    abstract_state, state_shardings, train_step = setup.abstract_state, setup.state_shardings, setup.train_step
    tokenizer_dir = config.tokenizer_dir

    # ---- resume order: the newest intact checkpoint, else (if nothing says there was one) a start from
    # config.init_from, else from scratch. A resume never reads init_from again.
    restored = restore_latest_train_state(manager, abstract_state, state_shardings, iterator)
    if restored is not None:
        state, start_step = restored
        writer.truncate_after(start_step)
        if is_main:
            print(f"resuming from {manager.directory}/{start_step} (step {start_step} of {num_steps})", flush=True)
    else:
        check_metrics_without_checkpoint(workdir, config)
        start_step = 0
        writer.truncate_after(0)
        state = initial_train_state(setup, config, model_config, is_main)
    if int(state["step"]) != start_step:
        raise ValueError(f"checkpoint {start_step} holds train-state step {int(state['step'])}")

    tokenizer = None
    if (config.sample.every_steps or config.eval.every_steps) and tokenizer_dir is not None:
        tokenizer = load_tokenizer_for(tokenizer_dir, model_config, "config.tokenizer_dir")

    evaluator = make_evaluator(config.eval, workdir, tokenizer_dir) if config.eval.every_steps else None

    tokens_per_step = config.batch_size * model_config.num_tokens
    flops_per_step = train_flops_per_token(model_config) * tokens_per_step
    peak = peak_flops_per_device(config)
    if is_main:
        n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
        print(f"LASADGen {model_config.attention}, {n_params / 1e6:.1f}M params, grid {model_config.grid}; "
              f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} device(s); global batch "
              f"{config.batch_size} x {model_config.num_tokens} tokens; {num_steps} steps; workdir {workdir}",
              flush=True)
        if jax.process_count() > 1 and not jax.distributed.is_initialized():
            print("warning: several processes but no jax.distributed.initialize (config.distributed.initialize="
                  "'no'?): without JAX's preemption service a SIGTERM ends the run without a checkpoint", flush=True)

    # ---- the step, compiled once before step 1 (the loop runs this executable): compile time, XLA's memory
    setup.compile_step(config.batch_size, model_config.num_tokens)
    if is_main:
        cache = jax.config.jax_compilation_cache_dir
        print(f"train step: compiled in {setup.train_step.compile_seconds:.1f} s"
              + (f" (compilation cache: {cache})" if cache else ""), flush=True)
        print(f"train step memory (XLA): {describe_memory(setup.train_step.memory_analysis())}", flush=True)

    # ---- the loop
    progress = tqdm(total=num_steps, initial=start_step, desc="train", unit="step", disable=not is_main,
                    dynamic_ncols=True, file=sys.stderr)
    pending, interval_start, interval_steps, data_seconds = [], time.time(), 0, 0.0
    step, preempted, last_metrics = start_step, False, {}
    skipped = SkippedSteps(config.max_consecutive_skips)
    with PreemptionFlag(install=jax.process_count() == 1) as preemption:
        while step < num_steps:
            data_start = time.perf_counter()   # the host waiting for input: what the pipeline fails to hide
            tokens, labels = global_batch(next(iterator), mesh)
            data_seconds += time.perf_counter() - data_start
            state, metrics = train_step(state, tokens, labels)
            step += 1
            pending.append(metrics)
            interval_steps += 1
            skipped.add(step, metrics["finite"])
            if manager.should_save(step):
                skipped.flush()
            save_checkpoint(manager, step, state, iterator)
            if step % config.log_every == 0 or step == num_steps:
                values = jax.device_get(pending)
                elapsed = time.time() - interval_start
                losses = np.array([v["loss"] for v in values])
                tokens_per_second = interval_steps * tokens_per_step / elapsed
                finite_losses = losses[np.isfinite(losses)]
                scalars = {"loss": float(np.mean(finite_losses)) if len(finite_losses) else float("nan"),
                           "last_loss": float(losses[-1]), "grad_norm": float(values[-1]["grad_norm"]),
                           "learning_rate": float(values[-1]["learning_rate"]),
                           "skipped_steps": int(state["skipped_steps"]), "steps_per_second": interval_steps / elapsed,
                           "tokens_per_second": tokens_per_second, "data_wait_fraction": data_seconds / elapsed}
                if peak is not None:
                    scalars["mfu"] = flops_per_step * interval_steps / elapsed / (peak * mesh.size)
                writer.write_scalars(step, scalars)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}", tok_s=f"{tokens_per_second:,.0f}",
                                     data_wait=f"{scalars['data_wait_fraction']:.0%}",
                                     skipped=scalars["skipped_steps"], refresh=False)
                progress.update(step - progress.n)
                last_metrics, pending, interval_start, interval_steps = scalars, [], time.time(), 0
                data_seconds = 0.0
            if config.sample.every_steps and (step % config.sample.every_steps == 0 or step == num_steps):
                picture = sample_grid(graphdef, rng_state_template, state["ema_params"], config, model_config,
                                      tokenizer, step)
                write_sample_grid(picture, workdir, step, writer)
                interval_start, data_seconds = time.time(), 0.0   # sampling time is not training throughput
            if evaluator is not None and (step % config.eval.every_steps == 0 or step == num_steps):
                result = evaluate_ema(evaluator, graphdef, rng_state_template, state["ema_params"], tokenizer,
                                      config, step)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items() if k in EVAL_SCALARS})
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {result[k]:.4g}" for k in EVAL_SCALARS if k in result)
                           + f" ({result['num_samples']} samples vs {result['reference']})")
                interval_start, data_seconds = time.time(), 0.0
            stop = preemption.raised or (jax.process_count() > 1 and manager.reached_preemption(step))
            if stop and step < num_steps:
                skipped.flush()
                if manager.latest_step() != step:
                    save_checkpoint(manager, step, state, iterator, force=True)
                finish_saves(manager)
                preempted = True
                if is_main:
                    tqdm.write(f"preempted (SIGTERM): saved checkpoint {step}; re-run the same command to resume")
                break
    progress.close()

    # ---- the end
    skipped.flush()
    if not preempted:
        if manager.latest_step() != step:
            save_checkpoint(manager, step, state, iterator, force=True)
        finish_saves(manager)
        export_params(graphdef, rng_state_template, state["ema_params"], workdir)
    summary = {"workdir": workdir, "start_step": start_step, "step": step, "num_steps": num_steps,
               "preempted": preempted, "last_metrics": last_metrics}
    if is_main and not preempted:
        samples_dir = epath.Path(workdir) / "samples"
        samples = sorted(path.name for path in samples_dir.iterdir()) if samples_dir.is_dir() else []
        sample_command = f"python -m lasadgen_jax.sample --ckpt={workdir}/params_ema" + (
            f" --tokenizer={config.tokenizer_dir}" if config.tokenizer_dir else "")
        print(f"done: {step} steps; EMA params in {workdir}/params_ema; metrics in {workdir}/metrics.jsonl and "
              f"{workdir}/tensorboard" + (f"; samples in {workdir}/samples/{samples[-1]}" if samples else "")
              + f"\nsample the EMA params: {sample_command}", flush=True)
    return summary


def main(argv):
    del argv
    train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    from lasadgen_jax import cli

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. configs/imagenet256.py",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and samples go here (default: config.workdir)")
    flags.mark_flags_as_required(["config"])
    cli.run(main)
