"""The CPU demo's data: a small VQ trained on Fashion-MNIST, and that dataset tokenized with it.

Both steps are cached in the workdir and resumable: WORKDIR/vq (the tokenizer trainer's workdir; its
`tokenizer/` is what the rest uses) and WORKDIR/tokens (the extraction's shards and manifest). A
re-run whose tokenizer and manifest exist does neither again.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from lasadgen_jax.data import manifest as manifests


def prepare_fashion_mnist_tokens(prepare: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
    """(token directory, tokenizer directory), training and extracting whatever is not cached yet."""
    if jax.process_count() > 1:
        raise ValueError("config.data.prepare='fashion_mnist' (the demo) runs in one process; extract tokens "
                         "with python -m lasadgen_jax.data.extract and set config.data.tokens_dir instead")
    vq_workdir = os.path.join(workdir, "vq")
    tokenizer_dir = os.path.join(vq_workdir, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        from lasadgen_jax.tokenizer.train import train_and_evaluate

        print(f"demo 1/2: training the small VQ tokenizer in {vq_workdir} "
              f"({prepare.vq.num_steps} steps of {prepare.vq.batch_size} images)", flush=True)
        train_and_evaluate(prepare.vq, vq_workdir)
    else:
        print(f"demo 1/2: tokenizer cached in {tokenizer_dir}", flush=True)

    tokens_dir = os.path.join(workdir, "tokens")
    if not os.path.isfile(os.path.join(tokens_dir, manifests.MANIFEST_FILE)):
        from lasadgen_jax.data.extract import extract

        print(f"demo 2/2: tokenizing {prepare.max_images} Fashion-MNIST training images (+ flips) into "
              f"{tokens_dir}", flush=True)
        extract(tokenizer_dir, "fashion_mnist", tokens_dir, split="train", image_size=prepare.image_size,
                crops="flip", shard_size=prepare.shard_size, batch_size=prepare.encode_batch_size,
                workers=2, max_images=prepare.max_images, fashion_mnist_root=prepare.fashion_mnist_root)
    else:
        print(f"demo 2/2: tokens cached in {tokens_dir}", flush=True)
    return tokens_dir, tokenizer_dir
