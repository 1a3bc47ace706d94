"""Train LASADGen on VQ token shards: sharded over a (data, fsdp, tensor) mesh, checkpointed with Orbax.

    python -m lasadgen_jax.train --config=configs/imagenet256.py --workdir=DIR --config.data.tokens_dir=TOKENS
    python -m lasadgen_jax.train --config=configs/demo.py      # CPU demo: tokenizer, tokens, model, samples

The workdir holds run.json (the model config that owns it), checkpoints/ (Orbax; the train state and
the data iterator's position, saved together), metrics.jsonl, tensorboard/, samples/ (PNG grids from
the EMA parameters) and, at the end, params_ema/ (what `python -m lasadgen_jax.sample --ckpt` reads).
Starting again in the same workdir resumes from the latest checkpoint at exactly the next batch;
SIGTERM (preemption) saves a checkpoint and exits cleanly (with several processes, at one step that
JAX's preemption service agrees on). The workdir may be gs://... (etils.epath and Orbax; README,
"Scaling out"); launch/ starts the processes of a multi-host run.

Sections: config -> workdir -> data -> model and optimizer -> train step -> checkpoints ->
logging and samples -> the loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from tqdm import tqdm

from lasadgen_jax import sharding
from lasadgen_jax.data import manifest as manifests
from lasadgen_jax.metric_writer import MetricWriter, is_remote
from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig

RUN_FILE = "run.json"
RUN_KIND = "lasadgen_jax.train"
# The ModelConfig fields that decide the parameters (and so whether a checkpoint belongs to a model).
CHECKPOINT_FIELDS = ("vocab_size", "num_classes", "grid", "dim", "depth", "num_heads", "attention", "num_prefix",
                     "ffn_multiple_of")
# Dense bf16 peak FLOP/s per chip, for the MFU estimate (config.peak_tflops_per_device overrides).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}


# ============================================================================= config


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
    unknown = set(fields) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"config.model has unknown fields {sorted(unknown)}")
    return ModelConfig(**fields)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuse settings the trainer cannot honour, naming the config key."""
    if config.batch_size < 1 or config.grad_accum_steps < 1:
        raise ValueError(f"config.batch_size ({config.batch_size}) and config.grad_accum_steps "
                         f"({config.grad_accum_steps}) must be >= 1")
    if config.batch_size % (config.grad_accum_steps * jax.process_count()):
        raise ValueError(f"config.batch_size {config.batch_size} must be divisible by config.grad_accum_steps "
                         f"({config.grad_accum_steps}) x processes ({jax.process_count()})")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.optimizer.schedule not in ("constant", "cosine"):
        raise ValueError(f"config.optimizer.schedule must be 'constant' or 'cosine', got {config.optimizer.schedule!r}")
    if config.checkpoint.every_steps < 1 or config.checkpoint.keep < 1 or config.log_every < 1:
        raise ValueError("config.checkpoint.every_steps, config.checkpoint.keep and config.log_every must be >= 1")
    if (config.data.tokens_dir is None) == (config.data.prepare is None):
        raise ValueError("set exactly one of config.data.tokens_dir (a token directory written by "
                         "lasadgen_jax.data.extract) and config.data.prepare ('fashion_mnist': the demo's own)")


def check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh) -> None:
    """Every (micro-)batch is split over the mesh's data x fsdp devices: it must divide evenly."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (config.grad_accum_steps * shards):
        raise ValueError(f"config.batch_size {config.batch_size} must be divisible by config.grad_accum_steps "
                         f"({config.grad_accum_steps}) x the mesh's data x fsdp ({mesh.shape['data']} x "
                         f"{mesh.shape['fsdp']}): each micro-batch is split over those devices")


def check_sample_config(sample: ml_collections.ConfigDict, model_config: ModelConfig) -> None:
    bad = [c for c in sample.classes if not 0 <= c < model_config.num_classes]
    if bad or sample.per_class < 1:
        raise ValueError(f"config.sample.classes must lie in [0, {model_config.num_classes}) and "
                         f"config.sample.per_class be >= 1; got classes {list(sample.classes)}, per_class "
                         f"{sample.per_class}")


def check_eval_config(evaluation: ml_collections.ConfigDict, tokenizer_configured: bool) -> None:
    if not evaluation.every_steps:
        return
    missing = [key for key in ("reference", "inception") if evaluation[key] is None]
    if missing or not tokenizer_configured:
        raise ValueError(f"config.eval.every_steps={evaluation.every_steps} needs config.eval.reference "
                         f"(an ADM-style .npz or 'fashion_mnist:test'), config.eval.inception (converted "
                         f"weights, python -m lasadgen_jax.eval.convert_inception) and a tokenizer; missing: "
                         f"{missing + ([] if tokenizer_configured else ['config.tokenizer_dir'])}")
    if jax.process_count() > 1:
        raise ValueError("config.eval.every_steps: periodic evaluation runs in one process for now; use "
                         "python -m lasadgen_jax.evaluate on the exported params_ema instead")


# config.distributed key -> the environment variable that supplies it when the config leaves it unset.
DISTRIBUTED_ENVIRONMENT = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
                           "process_id": "JAX_PROCESS_ID"}


def distributed_arguments(distributed: ml_collections.ConfigDict, environ) -> dict | None:
    """The arguments of jax.distributed.initialize, or None for a run of one process.

    Each of coordinator_address, num_processes and process_id comes from config.distributed, else from
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (launch/gpu/run_multinode.py sets
    them); whatever is still None, jax fills in from the cluster (SLURM, Open MPI, Cloud TPU metadata).
    'auto' initializes when one of these names a coordinator or several processes, or when the
    environment is a SLURM job step of several tasks, an Open MPI job or a multi-host TPU.
    """
    mode = distributed.initialize
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed.initialize must be 'auto', 'yes' or 'no', got {mode!r}")
    if mode == "no":
        return None
    arguments = {}
    for key, variable in DISTRIBUTED_ENVIRONMENT.items():
        value = distributed[key]
        if value is None and environ.get(variable, "") != "":
            value = environ[variable]
            if key != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"environment variable {variable}={value!r} is not an integer") from None
        arguments[key] = value
    num_processes, process_id = arguments["num_processes"], arguments["process_id"]
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"config.distributed.num_processes (or JAX_NUM_PROCESSES) must be >= 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ValueError(f"config.distributed.process_id (or JAX_PROCESS_ID) {process_id} is not in "
                         f"[0, num_processes={num_processes})")
    cluster = (
        (int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ)
        or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in environ.get("TPU_WORKER_HOSTNAMES", "")
    )
    if mode == "auto" and arguments["coordinator_address"] is None and (num_processes or 1) == 1 and not cluster:
        return None
    return arguments


def maybe_initialize_distributed(distributed: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize() when the config or the environment asks for it (distributed_arguments)."""
    arguments = distributed_arguments(distributed, os.environ)
    if arguments is None or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(**arguments)
    except ValueError as error:
        raise ValueError(f"jax.distributed.initialize({arguments}): {error}. Set config.distributed."
                         f"coordinator_address, num_processes and process_id (or JAX_COORDINATOR_ADDRESS, "
                         f"JAX_NUM_PROCESSES, JAX_PROCESS_ID), or run under SLURM / Open MPI / a Cloud TPU VM") from None


def sync_processes(name: str) -> None:
    """A barrier across processes (nothing in a run of one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ============================================================================= workdir


def check_locations(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The workdir may be a gs:// URI (checkpoints, run.json, metrics, samples, params_ema go through
    etils.epath and Orbax); the inputs read with plain file operations must be local or mounted."""
    local_only = {"config.data.tokens_dir": config.data.tokens_dir, "config.tokenizer_dir": config.tokenizer_dir,
                  "config.eval.reference": config.eval.reference, "config.eval.inception": config.eval.inception}
    remote = {key: value for key, value in local_only.items() if value is not None and is_remote(value)}
    if remote:
        raise ValueError(f"{remote}: these are read from a local (or mounted, e.g. gcsfuse) directory; copy them "
                         f"to every host first (launch/tpu/tpu.py --tokens does so for the tokens)")
    if not is_remote(workdir):
        return
    if config.data.prepare is not None:
        raise ValueError(f"--workdir {workdir!r}: the demo's data preparation (config.data.prepare) writes into a "
                         f"local workdir only")
    if config.eval.every_steps:
        raise ValueError(f"--workdir {workdir!r}: periodic evaluation (config.eval.every_steps) caches reference "
                         f"statistics in a local workdir only")
    import fsspec   # what etils.epath uses for gs:// when TensorFlow is absent

    try:
        fsspec.get_filesystem_class(workdir.split("://", 1)[0])
    except (ImportError, ValueError) as error:
        raise ValueError(f"--workdir {workdir!r}: {error} (gs:// needs `pip install gcsfs`)") from None


def write_bytes_atomically(path: epath.Path, data: bytes) -> None:
    """Locally: a temporary file renamed into place. On object stores (gs://) a write is atomic already."""
    if is_remote(path):
        path.write_bytes(data)
        return
    temporary = path.parent / f"{path.name}.tmp-{os.getpid()}"
    temporary.write_bytes(data)
    os.replace(temporary, path)


def claim_workdir(workdir: str, model_config: ModelConfig, config: ml_collections.ConfigDict) -> None:
    """Refuse a workdir that belongs to another model (or to something else); mark it as this run's.
    Every process checks; process 0 writes run.json once all of them have looked."""
    directory = epath.Path(workdir)
    run_file = directory / RUN_FILE
    wanted = {field: _jsonable(getattr(model_config, field)) for field in CHECKPOINT_FIELDS}
    if run_file.is_file():
        run = json.loads(run_file.read_text())
        if run.get("kind") != RUN_KIND:
            raise ValueError(f"--workdir {workdir!r}: {run_file} is not a {RUN_KIND} run; use another workdir")
        held = run.get("model_identity", {})
        differ = {k: (held.get(k), wanted[k]) for k in wanted if held.get(k) != wanted[k]}
        if differ:
            raise ValueError(f"--workdir {workdir!r} holds checkpoints of an incompatible model "
                             f"(field: (workdir's, config's) = {differ}); nothing was overwritten. "
                             f"Use a fresh workdir or the workdir's model config.")
        return
    if (directory / "checkpoints").is_dir():
        raise ValueError(f"--workdir {workdir!r} has checkpoints/ but no {RUN_FILE}: not a run of this trainer; "
                         f"refusing to write into it")
    sync_processes("lasadgen_jax.train: workdir checked")   # else process 0's checkpoints/ could alarm another
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        run = {"kind": RUN_KIND, "model_identity": wanted, "config": json.loads(config.to_json_best_effort())}
        write_bytes_atomically(run_file, json.dumps(run, indent=1, sort_keys=True).encode())


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


# ============================================================================= data


def prepare_tokens(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str | None]:
    """(token directory, tokenizer directory or None) of the run."""
    if config.data.tokens_dir is not None:
        return config.data.tokens_dir, config.tokenizer_dir
    if config.data.prepare != "fashion_mnist":
        raise ValueError(f"config.data.prepare must be 'fashion_mnist' (the demo), got {config.data.prepare!r}")
    from lasadgen_jax.demo_data import prepare_fashion_mnist_tokens

    return prepare_fashion_mnist_tokens(config.prepare, workdir)


def check_tokens_fit_model(tokens_dir: str, model_config: ModelConfig) -> dict:
    """The token directory's manifest, refused (ValueError, before anything is written) if its grid,
    codebook or classes disagree with the model."""
    manifest = manifests.read_manifest(tokens_dir)
    path = os.path.join(tokens_dir, manifests.MANIFEST_FILE)
    manifests.check_manifest_matches(manifest, path, model_config.grid, model_config.vocab_size)
    num_classes = manifest["spec"].get("num_classes")
    if num_classes is not None and num_classes > model_config.num_classes:
        raise ValueError(f"{path}: the tokens have {num_classes} classes, the model config "
                         f"(config.model.num_classes) only {model_config.num_classes}")
    return manifest


def open_data(config, tokens_dir: str, model_config: ModelConfig):
    """The checkpointable iterator over this process's batches ({"tokens", "label"} numpy)."""
    from lasadgen_jax.data.pipeline import token_dataset, token_iterator   # grain: only where data is read

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


# ============================================================================= model and optimizer


def make_schedule(optimizer: ml_collections.ConfigDict, num_steps: int):
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
    """AdamW with decoupled weight decay on matrices only (LlamaGen: ndim >= 2), after global-norm clipping."""
    schedule = make_schedule(optimizer, num_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optimizer.grad_clip_norm),
        optax.adamw(schedule, b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                    weight_decay=optimizer.weight_decay, mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)),
    )
    return tx, schedule


def abstract_model(model_config: ModelConfig):
    """(graphdef, abstract params as a pure dict, abstract non-parameter state: the dropout streams)."""
    model = nnx.eval_shape(lambda: LASADGen(model_config, rngs=nnx.Rngs(0)))
    graphdef, params, rng_state = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rng_state


def seeded_rng_state(rng_state_template, key):
    """The model's dropout streams, all derived from `key` (so a step's dropout is a function of the step)."""
    leaves, treedef = jax.tree.flatten(rng_state_template)
    fresh = []
    for index, leaf in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            fresh.append(jax.random.fold_in(key, index))
        elif leaf.dtype == jnp.uint32 and leaf.shape == ():
            fresh.append(jnp.zeros((), jnp.uint32))   # stream counters
        else:
            raise ValueError(f"unexpected non-parameter model state {leaf}; the trainer only expects RNG streams")
    return jax.tree.unflatten(treedef, fresh)


def init_params(model_config: ModelConfig, seed: int) -> dict:
    """Freshly initialised float32 parameters (pure dict), computed eagerly op by op: the blocks repeat
    a few shapes, so few kernels compile. One jit of the whole initialisation took XLA 3 minutes to
    compile for the L-size model on the H200."""
    model = LASADGen(model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def init_train_state(params: dict, tx) -> dict:
    """The train state: step, params (float32 master copy), optimizer state, EMA params, skipped steps."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "ema_params": jax.tree.map(jnp.copy, params), "skipped_steps": jnp.zeros((), jnp.int32)}


def abstract_train_state(model_config: ModelConfig, tx) -> dict:
    return jax.eval_shape(lambda params: init_train_state(params, tx), abstract_model(model_config)[1])


def create_train_state(model_config: ModelConfig, tx, seed: int, state_shardings: dict) -> dict:
    """The initial train state, placed by state_shardings."""
    params = init_params(model_config, seed)
    if jax.process_count() > 1:   # every process computed the same values; each places its shards
        params = jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index, x=np.asarray(x): x[index]),
            params, state_shardings["params"])
    else:
        params = jax.device_put(params, state_shardings["params"])
    return jax.jit(lambda params: init_train_state(params, tx), out_shardings=state_shardings)(params)


def train_state_shardings(abstract_state: dict, tx, mesh, rules) -> dict:
    """NamedShardings of the train state: params and EMA by the logical-axis rules, the optimizer's
    per-parameter statistics like their parameters, every scalar replicated."""
    params = sharding.param_shardings(abstract_state["params"], mesh, rules)
    replicated = sharding.replicated(mesh)
    opt_state = optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"], params,
                                      transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": params, "opt_state": opt_state, "ema_params": params,
            "skipped_steps": replicated}


# ============================================================================= train step


def make_train_step(graphdef, rng_state_template, tx, schedule, config, state_shardings, mesh):
    """One jitted step: forward/backward (over grad_accum_steps micro-batches), a NaN/inf guard that
    skips the update and counts it, AdamW, EMA. The state is donated."""
    accum, ema_decay, seed = config.grad_accum_steps, config.ema_decay, config.seed
    batch_sharding = sharding.batch_sharding(mesh)

    def loss_fn(params, tokens, labels, key):
        model = nnx.merge(graphdef, params, seeded_rng_state(rng_state_template, key))
        logits = model(tokens, labels)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    grad_fn = jax.value_and_grad(loss_fn)

    def accumulated_grads(params, tokens, labels, key):
        if accum == 1:
            return grad_fn(params, tokens, labels, key)
        # Example b of the batch goes to micro-batch b % accum: each device keeps its own rows.
        split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
        micro_tokens, micro_labels = split(tokens), split(labels)

        def one(carry, inputs):
            loss_sum, grad_sum = carry
            index, micro_t, micro_l = inputs
            micro_t = jax.lax.with_sharding_constraint(micro_t, batch_sharding)
            micro_l = jax.lax.with_sharding_constraint(micro_l, batch_sharding)
            loss, grads = grad_fn(params, micro_t, micro_l, jax.random.fold_in(key, index))
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss_sum, grad_sum), _ = jax.lax.scan(one, (jnp.zeros((), jnp.float32), zeros),
                                               (jnp.arange(accum), micro_tokens, micro_labels))
        return loss_sum / accum, jax.tree.map(lambda g: g / accum, grad_sum)

    def train_step(state, tokens, labels):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        loss, grads = accumulated_grads(state["params"], tokens, labels, key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_):
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema_params"], params)
            return params, opt_state, ema

        def skip(_):
            return state["params"], state["opt_state"], state["ema_params"]

        params, opt_state, ema = jax.lax.cond(finite, apply, skip, None)
        applied_updates = state["step"] - state["skipped_steps"]   # the optimizer's own step count
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema_params": ema,
                     "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32)}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "learning_rate": schedule(applied_updates)}
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, batch_sharding),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)

    def train_step_on_mesh(state, tokens, labels):
        """The jitted step, traced with `mesh` as the current mesh: the model's Pallas kernels then run
        per device under shard_map (models/lasad_attention.py) instead of on a gathered batch."""
        with jax.set_mesh(mesh):
            return jitted(state, tokens, labels)

    return train_step_on_mesh


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """What the loop (and the benchmark) needs besides data: model graph, optimizer, shardings, step."""

    graphdef: object
    rng_state_template: object
    tx: object
    schedule: object
    abstract_state: dict
    state_shardings: dict
    train_step: object

    def initial_state(self, model_config: ModelConfig, seed: int) -> dict:
        return create_train_state(model_config, self.tx, seed, self.state_shardings)


def setup_training(config, model_config: ModelConfig, mesh, num_steps: int) -> TrainingSetup:
    tx, schedule = make_optimizer(config.optimizer, num_steps)
    graphdef, _, rng_state_template = abstract_model(model_config)
    rng_state_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rng_state_template)
    abstract_state = abstract_train_state(model_config, tx)
    state_shardings = train_state_shardings(abstract_state, tx, mesh, config.sharding_rules)
    train_step = make_train_step(graphdef, rng_state_template, tx, schedule, config, state_shardings, mesh)
    return TrainingSetup(graphdef, rng_state_template, tx, schedule, abstract_state, state_shardings, train_step)


def train_flops_per_token(model_config: ModelConfig, block_tokens: int = 128) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward), for the MFU estimate.

    Matmuls with weights: 6 x their parameters. Token mixing per layer, forward: softmax (causal)
    2 x 2 x dim x N/2; LASAD 1d / none / 2d_row (chunked) the masked intra-block matmuls
    2 x 2 x dim x C/2 plus the state update and read 2 x 2 x dim x head_dim; exact 2d about
    8 x dim x head_dim (row fold, vertical update, column-state read; docs/lasad.md).
    """
    c = model_config
    head_dim = c.dim // c.num_heads
    projections = 4 if c.attention == "softmax" else 5  # q, k, v, (gate), out
    matmul_params = c.depth * (projections * c.dim * c.dim + 3 * c.dim * c.ffn_hidden) + c.dim * c.vocab_size
    tokens = c.num_tokens + c.num_prefix
    if c.attention == "softmax":
        mixing = 2 * 2 * c.dim * tokens / 2
    elif c.attention == "2d":
        mixing = 8 * c.dim * head_dim
    else:
        mixing = 2 * 2 * c.dim * min(block_tokens, tokens) / 2 + 2 * 2 * c.dim * head_dim
    return 6.0 * matmul_params + 3.0 * c.depth * mixing


def peak_flops_per_device(config) -> float | None:
    if config.peak_tflops_per_device is not None:
        return config.peak_tflops_per_device * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None  # CPU or unknown: no MFU


# ============================================================================= checkpoints


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
    """Orbax manager of (train state, data iterator position); saves are atomic (a temporary directory
    renamed when complete), asynchronous if configured, the newest `keep` kept."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.checkpoint.every_steps, max_to_keep=config.checkpoint.keep,
        enable_async_checkpointing=config.checkpoint.async_save, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(workdir_path(workdir, "checkpoints"), options=options, item_names=("state", "data"))


def workdir_path(workdir: str, name: str) -> epath.Path:
    """WORKDIR/name for Orbax: absolute when local, the URI itself on gs://."""
    if is_remote(workdir):
        return epath.Path(workdir) / name
    return epath.Path(os.path.abspath(os.path.join(workdir, name)))


def save_checkpoint(manager, step: int, state: dict, iterator, force: bool = False) -> bool:
    import grain

    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=grain.checkpoint.CheckpointSave(iterator)), force=force)


def restore_checkpoint(manager, step: int, abstract_state: dict, state_shardings: dict, iterator) -> dict:
    """The train state of `step`, placed by state_shardings (Orbax reshards a checkpoint written on
    another mesh); the iterator is moved to the checkpoint's position in place."""
    import grain

    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings)
    check_data_state_processes(epath.Path(manager.directory) / str(step) / "data", step)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 data=grain.checkpoint.CheckpointRestore(iterator)))
    except (ValueError, KeyError) as error:
        raise ValueError(f"checkpoint {manager.directory}/{step} does not fit this model and config: {error}") from None
    return restored["state"]


def check_data_state_processes(data_directory: epath.Path, step: int) -> None:
    """Refuse (clearly) a checkpoint whose data iterator positions come from another number of processes.

    grain saves one position per process (process_I-of-N.json). Each process reads the records i with
    i % N == I, so a position means nothing to a run of another process count: the parameters would
    restore (Orbax reshards them onto any mesh), the data order cannot continue exactly.
    """
    index, count = jax.process_index(), jax.process_count()
    if not data_directory.is_dir() or (data_directory / f"process_{index}-of-{count}.json").exists():
        return
    written = sorted(path.name for path in data_directory.glob("process_*-of-*.json"))
    counts = sorted({name.rsplit("-of-", 1)[1].removesuffix(".json") for name in written})
    raise ValueError(f"checkpoint {step} in {data_directory.parent.parent}: its data iterator positions were saved "
                     f"by {' or '.join(counts) or 'no'} process(es) ({', '.join(written[:4])}), this run has {count}. "
                     f"Each process reads its own slice of the records, so the run resumes exactly only with the "
                     f"same number of processes (hosts); the mesh and device count may change.")


class PreemptionFlag:
    """Set by SIGTERM; the loop saves a checkpoint at the next step boundary and returns.

    Only in a run of one process. With several, each process would stop at whatever step its own
    signal found it, and the others would wait forever in that step's collectives; there the signal is
    left to JAX's preemption service (started by jax.distributed.initialize), which agrees on one
    step for all processes: `manager.reached_preemption(step)`.
    """

    def __init__(self, install: bool = True):
        self.raised = False
        self.previous = None
        self.install = install

    def __enter__(self):
        # Signals reach the main thread only.
        if self.install and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# ============================================================================= logging and samples


def sample_grid(graphdef, rng_state_template, ema_params, config, model_config: ModelConfig, tokenizer, step: int):
    """A uint8 picture of samples from the EMA parameters: one row per configured class."""
    from lasadgen_jax.sample import SamplingConfig, decode_to_uint8, generate, tile, token_grid_picture

    model = nnx.merge(graphdef, ema_params, seeded_rng_state(rng_state_template, jax.random.key(0)))
    model.eval()
    classes = list(config.sample.classes)
    labels = np.repeat(np.asarray(classes, np.int32), config.sample.per_class)
    sampling = SamplingConfig(cfg_scale=config.sample.cfg_scale, temperature=config.sample.temperature,
                              top_k=config.sample.top_k, top_p=config.sample.top_p)
    tokens = generate(model, labels, jax.random.fold_in(jax.random.key(config.seed + 7), step), sampling)
    if not tokens.is_fully_addressable:
        from jax.experimental import multihost_utils

        tokens = multihost_utils.process_allgather(tokens, tiled=True)
    tokens = np.asarray(tokens)
    if tokenizer is None:
        return token_grid_picture(tokens, model_config.vocab_size, columns=config.sample.per_class)
    return tile(decode_to_uint8(tokenizer, tokens, batch_size=len(tokens)), columns=config.sample.per_class)


def write_sample_grid(picture: np.ndarray, workdir: str, step: int, writer: MetricWriter) -> str | None:
    if jax.process_index() != 0:
        return None
    import io

    from PIL import Image

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
    from lasadgen_jax.eval.features import FeatureExtractor
    from lasadgen_jax.eval.reference import load_reference
    from lasadgen_jax.evaluate import parse_metrics

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
    from lasadgen_jax.evaluate import sample_and_evaluate
    from lasadgen_jax.sample import SamplingConfig

    model = nnx.merge(graphdef, ema_params, seeded_rng_state(rng_state_template, jax.random.key(0)))
    model.eval()
    sampling = SamplingConfig(cfg_scale=config.eval.cfg_scale, temperature=config.sample.temperature,
                              top_k=config.sample.top_k, top_p=config.sample.top_p)
    return sample_and_evaluate(model, tokenizer, evaluator["reference"], evaluator["extractor"],
                               config.eval.num_samples, jax.random.PRNGKey(config.seed + 11 + step), sampling,
                               batch_size=config.eval.batch_size, metrics=evaluator["metrics"], progress=False)


def export_params(graphdef, rng_state_template, params, workdir: str) -> None:
    """The (EMA) parameters as WORKDIR/params_ema (sample.save_params), for `sample --ckpt`; every
    process takes part, and an earlier export is replaced."""
    from lasadgen_jax.sample import save_params

    model = nnx.merge(graphdef, params, seeded_rng_state(rng_state_template, jax.random.key(0)))
    save_params(model, workdir_path(workdir, "params_ema"), force=True)


# ============================================================================= the loop


def resolve_workdir(workdir: str | None, config) -> str:
    workdir = workdir or config.workdir
    if not workdir:
        raise ValueError("no workdir: pass --workdir=DIR (or set config.workdir)")
    return workdir


def num_training_steps(config, manifest: dict) -> int:
    if config.num_steps is not None:
        if config.num_steps < 1:
            raise ValueError(f"config.num_steps must be >= 1, got {config.num_steps}")
        return config.num_steps
    return max(1, config.num_epochs * manifest["num_records"] // config.batch_size)


def train(config: ml_collections.ConfigDict, workdir: str | None = None, *, devices=None) -> dict:
    """Train (resuming from the workdir's latest checkpoint); returns a summary of the run.

    devices: the devices of the mesh (default: all of them).
    """
    # ---- config, distributed set-up, workdir
    maybe_initialize_distributed(config.distributed)
    check_config(config)
    model_config = model_config_from(config)
    check_sample_config(config.sample, model_config)
    check_eval_config(config.eval, config.tokenizer_dir is not None or config.data.prepare is not None)
    workdir = resolve_workdir(workdir, config)
    check_locations(config, workdir)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    check_batch_fits_mesh(config, mesh)
    if config.data.tokens_dir is not None:
        check_tokens_fit_model(config.data.tokens_dir, model_config)   # before anything is written
    claim_workdir(workdir, model_config, config)
    tokens_dir, tokenizer_dir = prepare_tokens(config, workdir)
    manifest = check_tokens_fit_model(tokens_dir, model_config)
    num_steps = num_training_steps(config, manifest)
    is_main = jax.process_index() == 0

    # ---- model, optimizer, shardings
    setup = setup_training(config, model_config, mesh, num_steps)
    graphdef, rng_state_template = setup.graphdef, setup.rng_state_template
    abstract_state, state_shardings, train_step = setup.abstract_state, setup.state_shardings, setup.train_step

    # ---- data and checkpoint
    iterator = open_data(config, tokens_dir, model_config)
    manager = checkpoint_manager(workdir, config)
    writer = MetricWriter(workdir, enabled=is_main)
    start_step = manager.latest_step()
    if start_step is not None:
        state = restore_checkpoint(manager, start_step, abstract_state, state_shardings, iterator)
        writer.truncate_after(start_step)
        if is_main:
            print(f"resuming from {manager.directory}/{start_step} (step {start_step} of {num_steps})", flush=True)
    else:
        start_step = 0
        state = setup.initial_state(model_config, config.seed)
    if int(state["step"]) != start_step:
        raise ValueError(f"checkpoint {start_step} holds train-state step {int(state['step'])}")

    tokenizer = None
    if (config.sample.every_steps or config.eval.every_steps) and tokenizer_dir is not None:
        from lasadgen_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
        if tokenizer.arch.codebook_size != model_config.vocab_size:
            raise ValueError(f"tokenizer {tokenizer_dir} has a codebook of {tokenizer.arch.codebook_size}, "
                             f"config.model.vocab_size is {model_config.vocab_size}")

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

    # ---- the loop
    progress = tqdm(total=num_steps, initial=start_step, desc="train", unit="step", disable=not is_main,
                    dynamic_ncols=True, file=sys.stderr)
    pending, interval_start, interval_steps = [], time.time(), 0
    step, preempted, last_metrics = start_step, False, {}
    with PreemptionFlag(install=jax.process_count() == 1) as preemption:
        while step < num_steps:
            tokens, labels = global_batch(next(iterator), mesh)
            state, metrics = train_step(state, tokens, labels)
            step += 1
            pending.append(metrics)
            interval_steps += 1
            save_checkpoint(manager, step, state, iterator)
            if step % config.log_every == 0 or step == num_steps:
                values = jax.device_get(pending)
                elapsed = time.time() - interval_start
                losses = np.array([v["loss"] for v in values])
                tokens_per_second = interval_steps * tokens_per_step / elapsed
                scalars = {"loss": float(np.mean(losses[np.isfinite(losses)])) if np.isfinite(losses).any() else float("nan"),
                           "last_loss": float(losses[-1]), "grad_norm": float(values[-1]["grad_norm"]),
                           "learning_rate": float(values[-1]["learning_rate"]),
                           "skipped_steps": int(state["skipped_steps"]), "steps_per_second": interval_steps / elapsed,
                           "tokens_per_second": tokens_per_second}
                if peak is not None:
                    scalars["mfu"] = flops_per_step * interval_steps / elapsed / (peak * mesh.size)
                writer.write_scalars(step, scalars)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}", tok_s=f"{tokens_per_second:,.0f}",
                                     skipped=scalars["skipped_steps"], refresh=False)
                progress.update(step - progress.n)
                last_metrics, pending, interval_start, interval_steps = scalars, [], time.time(), 0
            if config.sample.every_steps and (step % config.sample.every_steps == 0 or step == num_steps):
                picture = sample_grid(graphdef, rng_state_template, state["ema_params"], config, model_config,
                                      tokenizer, step)
                write_sample_grid(picture, workdir, step, writer)
                interval_start = time.time()   # sampling time is not training throughput
            if evaluator is not None and (step % config.eval.every_steps == 0 or step == num_steps):
                result = evaluate_ema(evaluator, graphdef, rng_state_template, state["ema_params"], tokenizer,
                                      config, step)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items() if k in EVAL_SCALARS})
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {result[k]:.4g}" for k in EVAL_SCALARS if k in result)
                           + f" ({result['num_samples']} samples vs {result['reference']})")
                interval_start = time.time()
            stop = preemption.raised or (jax.process_count() > 1 and manager.reached_preemption(step))
            if stop and step < num_steps:
                if manager.latest_step() != step:
                    save_checkpoint(manager, step, state, iterator, force=True)
                manager.wait_until_finished()
                preempted = True
                if is_main:
                    tqdm.write(f"preempted (SIGTERM): saved checkpoint {step}; re-run the same command to resume")
                break
    progress.close()

    # ---- the end
    if not preempted:
        if manager.latest_step() != step:
            save_checkpoint(manager, step, state, iterator, force=True)
        manager.wait_until_finished()
        export_params(graphdef, rng_state_template, state["ema_params"], workdir)
    manager.close()
    writer.close()
    summary = {"workdir": workdir, "start_step": start_step, "step": step, "num_steps": num_steps,
               "preempted": preempted, "last_metrics": last_metrics}
    if is_main and not preempted:
        samples_dir = epath.Path(workdir) / "samples"
        samples = sorted(path.name for path in samples_dir.iterdir()) if samples_dir.is_dir() else []
        print(f"done: {step} steps; EMA params in {workdir}/params_ema (python -m lasadgen_jax.sample "
              f"--ckpt={workdir}/params_ema); metrics in {workdir}/metrics.jsonl and {workdir}/tensorboard"
              + (f"; samples in {workdir}/samples/{samples[-1]}" if samples else ""), flush=True)
    return summary


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO, burying the progress bar
    train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. configs/imagenet256.py",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and samples go here (default: config.workdir)")
    flags.mark_flags_as_required(["config"])
    try:
        app.run(main)
    except ValueError as error:  # bad config, workdir or data: one clear line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
