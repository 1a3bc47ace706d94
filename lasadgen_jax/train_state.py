"""The train state and the jitted step over it: a LASADGen model split into its graph and a pure dict
of float32 parameters, AdamW (optimizer.py) with its schedule, EMA parameters, NamedShardings from the
logical-axis rules, and one step (gradient accumulation, NaN/inf guard, AdamW, EMA) with the state
donated. The trainer's loop (train.py) and the training-step benchmarks build on setup_training.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lasadgen_jax import sharding
from lasadgen_jax.loss import next_token_loss
from lasadgen_jax.models.lasadgen import LASADGen, ModelConfig
from lasadgen_jax.optimizer import make_optimizer

# ----------------------------------------------------------------------------- model and optimizer


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
    """The initial train state from fresh parameters, placed by state_shardings."""
    return train_state_from_params(init_params(model_config, seed), tx, state_shardings)


def train_state_from_params(params: dict, tx, state_shardings: dict) -> dict:
    """The initial train state around `params` (the same values in every process), placed by state_shardings."""
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


# ----------------------------------------------------------------------------- the step


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (integer leaves, e.g. counts, are)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


# all_finite as one compiled program, for a state outside the step (the check before a checkpoint
# save and after a restore): one dispatch and one set of collectives for the whole sharded state.
# Eager jnp calls would run one small program per leaf, each with its own collectives; on XLA:CPU's
# fake devices of a 2x2x2 mesh those could leave the devices waiting on each other's rendezvous.
jitted_all_finite = jax.jit(all_finite)


def make_train_step(graphdef, rng_state_template, tx, schedule, config, state_shardings, mesh):
    """One jitted step: forward/backward (over grad_accum_steps micro-batches), AdamW, EMA, and a NaN/inf
    guard that keeps the old state (and counts the step as skipped) unless the loss, the gradient norm
    and the learning rate are all finite. The state is donated."""
    accum, ema_decay, seed = config.grad_accum_steps, config.ema_decay, config.seed
    batch_sharding = sharding.batch_sharding(mesh)

    def loss_fn(params, tokens, labels, key):
        model = nnx.merge(graphdef, params, seeded_rng_state(rng_state_template, key))
        return next_token_loss(model, tokens, labels)

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
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema_params"], params)
        applied_updates = state["step"] - state["skipped_steps"]   # the optimizer's own step count
        learning_rate = schedule(applied_updates)
        # The guard decides from the scalars the update is made of: with a finite loss, a finite gradient
        # norm (no gradient element or square overflows) and a finite learning rate, Adam's moments, the
        # clipped AdamW update of finite parameters and the EMA are finite, unless the learning rate is
        # large enough to carry a parameter past float32's range. Known before the update, the decision
        # fuses into the update's own pass over the state; checking the updated state instead took a
        # reduction per leaf and a second pass (RESULTS.md, "Training step: the NaN/inf guard from
        # scalars"). A state that still turns non-finite is never saved (checkpoints.py).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(learning_rate)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                     "opt_state": keep(opt_state, state["opt_state"]), "ema_params": keep(ema, state["ema_params"]),
                     "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32)}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "learning_rate": learning_rate}
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, batch_sharding),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)
    return TrainStep(jitted, mesh)


class TrainStep:
    """The jitted step, traced with `mesh` as the current mesh (the model's Pallas kernels then run per
    device under shard_map, models/lasad_attention.py, instead of on a gathered batch).

    `compile` compiles it ahead of time (from abstract or concrete arguments) and keeps the executable:
    later calls run that executable, so the step the memory analysis describes is the one that runs and
    is compiled once. Without `compile`, calls go through jax.jit (compiled on first use)."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh
        self.compiled, self.compile_seconds = None, None

    def compile(self, state, tokens, labels):
        """Compiles for these argument shapes, dtypes and shardings; returns the executable."""
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            self.compiled = self.jitted.lower(state, tokens, labels).compile()
        self.compile_seconds = time.perf_counter() - start
        return self.compiled

    def memory_analysis(self) -> dict | None:
        """XLA's per-device sizes of the compiled step in bytes (None where the backend gives none)."""
        if self.compiled is None:
            raise ValueError("memory_analysis needs the step compiled first (TrainStep.compile)")
        return compiled_memory(self.compiled)

    def __call__(self, state, tokens, labels):
        if self.compiled is not None:
            return self.compiled(state, tokens, labels)
        with jax.set_mesh(self.mesh):
            return self.jitted(state, tokens, labels)


def compiled_memory(compiled) -> dict | None:
    """Per-device bytes of a compiled executable from XLA's memory analysis: argument, output, alias (donated
    arguments, counted in both), temp and generated_code; peak_estimate = argument + output - alias + temp
    + generated_code; xla_peak, XLA's own peak where the backend reports one (else None). None where
    memory_analysis() is unavailable."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    sizes = {name: int(getattr(analysis, f"{name}_size_in_bytes"))
             for name in ("argument", "output", "alias", "temp", "generated_code")}
    sizes["peak_estimate"] = (sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
                              + sizes["generated_code"])
    sizes["xla_peak"] = int(getattr(analysis, "peak_memory_in_bytes", 0) or 0) or None
    return sizes


def describe_memory(sizes: dict | None) -> str:
    """One line of compiled_memory's sizes, or 'unavailable'."""
    if sizes is None:
        return "unavailable (the backend gives no memory analysis)"
    readable = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
    xla_peak = f", XLA's peak {readable(sizes['xla_peak'])}" if sizes["xla_peak"] else ""
    return (f"arguments {readable(sizes['argument'])}, outputs {readable(sizes['output'])} (donated "
            f"{readable(sizes['alias'])}), temp {readable(sizes['temp'])}, generated code "
            f"{readable(sizes['generated_code'])}; peak estimate {readable(sizes['peak_estimate'])} "
            f"(arguments + outputs - donated + temp + code){xla_peak}; per device")


class TrainingDiverged(FloatingPointError):
    """config.max_consecutive_skips steps in a row were skipped (non-finite loss, gradient or update)."""


class SkippedSteps:
    """Counts consecutive skipped steps from each step's `finite` flag, read one step late (so that the
    host does not wait for the device every step; `flush` reads the last one, before saves and at the
    end), and raises TrainingDiverged at config.max_consecutive_skips in a row."""

    def __init__(self, limit: int):
        self.limit, self.run, self.unread = limit, [], None

    def add(self, step: int, finite) -> None:
        previous, self.unread = self.unread, (step, finite)
        if previous is not None:
            self._count(*previous)

    def flush(self) -> None:
        if self.unread is not None:
            self._count(*self.unread)
            self.unread = None

    def _count(self, step: int, finite) -> None:
        if bool(finite):
            self.run = []
            return
        self.run.append(step)
        if len(self.run) >= self.limit:
            raise TrainingDiverged(f"steps {self.run[0]}-{self.run[-1]}: {len(self.run)} steps in a row skipped "
                                   f"(config.max_consecutive_skips={self.limit}): non-finite loss, gradients or "
                                   f"updated state; the checkpoints hold the last good state. Lower "
                                   f"config.optimizer.learning_rate or check the data")


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """What the loop (and the benchmark) needs besides data: model graph, optimizer, shardings, step."""

    graphdef: object
    rng_state_template: object
    tx: object
    schedule: object
    abstract_state: dict
    state_shardings: dict
    train_step: TrainStep
    batch_sharding: object

    def abstract_batch(self, batch_size: int, num_tokens: int):
        """(tokens, labels) as ShapeDtypeStructs with the batch sharding: what the step compiles for."""
        return (jax.ShapeDtypeStruct((batch_size, num_tokens), jnp.int32, sharding=self.batch_sharding),
                jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=self.batch_sharding))

    def abstract_state_on_mesh(self) -> dict:
        """The train state as ShapeDtypeStructs with its shardings."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def compile_step(self, batch_size: int, num_tokens: int):
        """Compiles the step ahead of time for this global batch (TrainStep.compile) from shapes alone."""
        return self.train_step.compile(self.abstract_state_on_mesh(), *self.abstract_batch(batch_size, num_tokens))

    def initial_state(self, model_config: ModelConfig, seed: int) -> dict:
        return create_train_state(model_config, self.tx, seed, self.state_shardings)

    def state_from_params(self, params: dict) -> dict:
        """The initial train state around given parameters (e.g. config.init_from's, linearize.py)."""
        return train_state_from_params(params, self.tx, self.state_shardings)


def setup_training(config, model_config: ModelConfig, mesh, num_steps: int) -> TrainingSetup:
    tx, schedule = make_optimizer(config.optimizer, num_steps, config.freeze_non_attention_steps)
    graphdef, _, rng_state_template = abstract_model(model_config)
    rng_state_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rng_state_template)
    abstract_state = abstract_train_state(model_config, tx)
    state_shardings = train_state_shardings(abstract_state, tx, mesh, config.sharding_rules)
    train_step = make_train_step(graphdef, rng_state_template, tx, schedule, config, state_shardings, mesh)
    return TrainingSetup(graphdef, rng_state_template, tx, schedule, abstract_state, state_shardings, train_step,
                         sharding.batch_sharding(mesh))
