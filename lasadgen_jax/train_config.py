"""The trainer's config, checked before anything is written: each refusal is one ValueError naming
the config key; and what follows from the config (the number of steps, the workdir)."""

from __future__ import annotations

import math
import os

import jax
import ml_collections

from lasadgen_jax.data import manifest as manifests
from lasadgen_jax.models.lasadgen import ModelConfig


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
    check_optimizer_config(config.optimizer)
    freeze = config.freeze_non_attention_steps
    if isinstance(freeze, bool) or not isinstance(freeze, int) or freeze < 0:
        raise ValueError(f"config.freeze_non_attention_steps must be an integer >= 0, got {freeze!r}")
    if freeze and config.init_from is None:
        raise ValueError(f"config.freeze_non_attention_steps={freeze} holds trained parameters still while the "
                         f"attention settles: set config.init_from (the model to start from)")
    if config.max_consecutive_skips < 1:
        raise ValueError(f"config.max_consecutive_skips must be >= 1, got {config.max_consecutive_skips}")
    if config.checkpoint.every_steps < 1 or config.checkpoint.keep < 1 or config.log_every < 1:
        raise ValueError("config.checkpoint.every_steps, config.checkpoint.keep and config.log_every must be >= 1")
    if config.data.tokens_dir is None:
        raise ValueError("config.data.tokens_dir is not set: a token directory written by python -m "
                         "lasadgen_jax.data.extract (the CPU demo, python -m lasadgen_jax.demo, writes its own)")


def check_optimizer_config(optimizer: ml_collections.ConfigDict, key: str = "config.optimizer") -> None:
    """Refuse optimizer settings that would write non-finite parameters, naming the config key (both trainers)."""
    def number(name):
        value = optimizer[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key}.{name} must be a finite number, got {value!r}")
        return value

    bounds = {"learning_rate": (lambda v: v > 0, "> 0"), "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
              "b2": (lambda v: 0 <= v < 1, "in [0, 1)"), "eps": (lambda v: v > 0, "> 0"),
              "weight_decay": (lambda v: v >= 0, ">= 0"), "grad_clip_norm": (lambda v: v > 0, "> 0"),
              "warmup_steps": (lambda v: v >= 0, ">= 0")}
    for name, (valid, wanted) in bounds.items():
        if not valid(number(name)):
            raise ValueError(f"{key}.{name} must be {wanted}, got {optimizer[name]!r}")
    if optimizer.schedule not in ("constant", "cosine"):
        raise ValueError(f"{key}.schedule must be 'constant' or 'cosine', got {optimizer.schedule!r}")
    if optimizer.schedule == "cosine" and not 0 <= number("end_learning_rate_fraction") <= 1:
        raise ValueError(f"{key}.end_learning_rate_fraction must be in [0, 1], got "
                         f"{optimizer.end_learning_rate_fraction!r}")


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


def resolve_workdir(workdir: str | None, config: ml_collections.ConfigDict) -> str:
    workdir = workdir or config.workdir
    if not workdir:
        raise ValueError("no workdir: pass --workdir=DIR (or set config.workdir)")
    return workdir


def num_training_steps(config: ml_collections.ConfigDict, manifest: dict) -> int:
    """config.num_steps, else config.num_epochs over the token manifest's records."""
    if config.num_steps is not None:
        if config.num_steps < 1:
            raise ValueError(f"config.num_steps must be >= 1, got {config.num_steps}")
        return config.num_steps
    return max(1, config.num_epochs * manifest["num_records"] // config.batch_size)
