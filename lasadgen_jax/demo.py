"""The CPU demo, end to end: a small VQ tokenizer trained on Fashion-MNIST, the training images
tokenized with it, then LASADGen trained on those tokens (the trainer of lasadgen_jax/train.py).

    python -m lasadgen_jax.demo                      # configs/demo.py, workdir: workdirs/demo
    python -m lasadgen_jax.demo --workdir=DIR --config.num_steps=200

Each stage is cached in the workdir and resumable: WORKDIR/vq (the tokenizer trainer's workdir; its
`tokenizer/` is what the rest uses), WORKDIR/tokens (the extraction's shards and manifest), then the
trainer's own files in WORKDIR (run.json, checkpoints/, samples/, params_ema/, ...). A re-run whose
tokenizer and manifest exist trains neither again; the trainer resumes from its latest checkpoint.
config.prepare (configs/demo.py) holds the tokenizer's config and the extraction settings.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from lasadgen_jax import cli
from lasadgen_jax.data import manifest as manifests
from lasadgen_jax.data.extract import extract
from lasadgen_jax.metric_writer import is_remote
from lasadgen_jax.model_io import model_config_from
from lasadgen_jax.tokenizer.train import train_and_evaluate as train_tokenizer
from lasadgen_jax.train import claim_train_workdir, train
from lasadgen_jax.train_config import check_config, check_eval_config, check_sample_config, resolve_workdir


def check_local_workdir(workdir: str) -> None:
    if is_remote(workdir):
        raise ValueError(f"--workdir {workdir!r}: the demo's data preparation (python -m lasadgen_jax.demo) writes "
                         f"into a local workdir only")


def demo_data_dirs(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
    """(token directory, tokenizer directory) of the demo in `workdir`; the config must leave both unset."""
    given = {key: value for key, value in (("config.data.tokens_dir", config.data.tokens_dir),
                                           ("config.tokenizer_dir", config.tokenizer_dir)) if value is not None}
    if given:
        raise ValueError(f"{given}: the demo writes its own tokens and tokenizer into the workdir; leave these unset "
                         f"(or train on your tokens with python -m lasadgen_jax.train)")
    return os.path.join(workdir, "tokens"), os.path.join(workdir, "vq", "tokenizer")


def prepare_fashion_mnist_tokens(prepare: ml_collections.ConfigDict, tokens_dir: str, tokenizer_dir: str) -> None:
    """Trains the tokenizer (into the parent of tokenizer_dir) and extracts the tokens, unless cached."""
    vq_workdir = os.path.dirname(tokenizer_dir)
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        print(f"demo 1/2: training the small VQ tokenizer in {vq_workdir} "
              f"({prepare.vq.num_steps} steps of {prepare.vq.batch_size} images)", flush=True)
        train_tokenizer(prepare.vq, vq_workdir)
    else:
        print(f"demo 1/2: tokenizer cached in {tokenizer_dir}", flush=True)

    if not os.path.isfile(os.path.join(tokens_dir, manifests.MANIFEST_FILE)):
        print(f"demo 2/2: tokenizing {prepare.max_images} Fashion-MNIST training images (+ flips) into "
              f"{tokens_dir}", flush=True)
        extract(tokenizer_dir, "fashion_mnist", tokens_dir, split="train", image_size=prepare.image_size,
                crops="flip", shard_size=prepare.shard_size, batch_size=prepare.encode_batch_size,
                workers=2, max_images=prepare.max_images, fashion_mnist_root=prepare.fashion_mnist_root)
    else:
        print(f"demo 2/2: tokens cached in {tokens_dir}", flush=True)


def run_demo(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
    """Tokenizer, tokens, then the trainer (its summary). The trainer's refusals of the config and of the
    workdir come first, before minutes of tokenizer training."""
    if jax.process_count() > 1:
        raise ValueError("the demo runs in one process; extract tokens with python -m lasadgen_jax.data.extract "
                         "and train with python -m lasadgen_jax.train --config.data.tokens_dir=... instead")
    workdir = resolve_workdir(workdir, config)
    check_local_workdir(workdir)
    tokens_dir, tokenizer_dir = demo_data_dirs(config, workdir)
    config.data.tokens_dir, config.tokenizer_dir = tokens_dir, tokenizer_dir
    check_config(config)
    model_config = model_config_from(config)
    check_sample_config(config.sample, model_config)
    check_eval_config(config.eval, tokenizer_configured=True)
    claim_train_workdir(workdir, model_config, config)
    prepare_fashion_mnist_tokens(config.prepare, tokens_dir, tokenizer_dir)
    return train(config, workdir)


def main(argv):
    del argv
    run_demo(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", "configs/demo.py", "the demo's config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "tokenizer, tokens, checkpoints and samples go here (default: "
                        "config.workdir)")
    cli.run(main)
