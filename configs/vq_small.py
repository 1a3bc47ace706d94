"""The small trainable VQ of the CPU demo: Fashion-MNIST 32x32 -> an 8x8 grid of 1024 codes.

    python -m lasadgen_jax.tokenizer.train --config=configs/vq_small.py --workdir=workdirs/vq_small
    python -m lasadgen_jax.tokenizer.train --config=configs/vq_small.py:smoke --workdir=/tmp/vq_smoke
    python -m lasadgen_jax.tokenizer.train --config=configs/vq_small.py:grid16 --workdir=workdirs/vq_grid16

`:smoke` shrinks everything for a seconds-long run (tests). `:grid16` drops one downsampling level:
32x32 -> a 16x16 grid, the token count of ImageNet 256 with VQ-16 (the attention ablation,
benchmarks/ablation.py). Any field can be overridden with
`--config.field=value`; the config is locked, so a misspelt field is an error.
"""

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from lasadgen_jax.tokenizer.architecture import VQ_SMALL


def get_config(profile: str = "default") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Architecture: the VQ_SMALL preset (base_channels 16, channel_multipliers (1, 2, 2),
    # num_res_blocks 1, z_channels 32, a 1024 x 8 l2-normalised codebook, GroupNorm of 8 groups),
    # the same code path as LlamaGen's VQ-16.
    config.model = ml_collections.ConfigDict(dataclasses.asdict(VQ_SMALL))

    config.data = ml_collections.ConfigDict(dict(
        dataset="fashion_mnist",                       # the only training dataset for now
        fashion_mnist_root=placeholder(str),          # None: $LASADGEN_FASHION_MNIST, Debian's package, or the
                                                      # subset in the package (lasadgen_jax/data/fashion_mnist.py)
        eval_images=1000,                              # test-split images for the final PSNR/usage
    ))

    config.loss = ml_collections.ConfigDict(dict(
        reconstruction="mse",        # mse | l1, on images in [-1, 1]
        codebook_weight=1.0,         # || sg(z) - q ||^2
        commitment_beta=0.25,        # || z - sg(q) ||^2, LlamaGen's beta
    ))

    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=2e-3,
        schedule="cosine",
        warmup_steps=50,
        end_learning_rate_fraction=0.1,   # cosine decay to this fraction of the peak
        b1=0.9,
        b2=0.99,
        eps=1e-8,
        weight_decay=0.0,                 # (on matrices only, as in the main trainer)
        grad_clip_norm=1.0,
    ))

    config.seed = 0
    # About 3 minutes on 2 CPU cores (benchmarks/RESULTS.md has the measured PSNR and usage).
    config.batch_size = 32
    config.num_steps = 400
    config.checkpoint_every = 100
    config.keep_checkpoints = 2
    config.max_consecutive_skips = 5    # steps in a row with a non-finite loss or update before the run stops
    config.reconstruction_images = 32   # test images in each reconstruction PNG

    if profile == "smoke":
        config.model.update(base_channels=8, z_channels=8, codebook_size=64, codebook_dim=4, num_groups=4)
        config.data.eval_images = 64
        config.batch_size = 8
        config.num_steps = 4
        config.checkpoint_every = 2
        config.optimizer.warmup_steps = 1
        config.reconstruction_images = 16
    elif profile == "grid16":
        config.model.channel_multipliers = (1, 2)
    elif profile != "default":
        raise ValueError(f"unknown vq_small profile {profile!r}; known: default, smoke, grid16")

    config.lock()
    return config
