"""The embedded default: a small LASADGen (2d) on Fashion-MNIST, end to end on a CPU.

    python -m lasadgen_jax.demo      # workdir: workdirs/demo

Trains the small VQ tokenizer (configs/vq_small.py) unless WORKDIR/vq/tokenizer exists, tokenizes
the training images (+ horizontal flips) into WORKDIR/tokens (config.prepare; the demo sets
config.data.tokens_dir and config.tokenizer_dir to these), trains the model below, and writes
sample grids (one row per class, from the EMA parameters) to WORKDIR/samples/. About 15 minutes on
2 CPU cores (benchmarks/RESULTS.md). Everything else is as configs/imagenet256.py.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from lasadgen_jax.config_files import config_beside


def get_config() -> ml_collections.ConfigDict:
    config = config_beside(__file__, "imagenet256:size=B,attention=2d")
    config.model.update(grid=(8, 8), vocab_size=1024, num_classes=10, dim=192, depth=4, num_heads=4,
                        ffn_multiple_of=64, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0,
                        dtype="float32")   # float32 compute: XLA:CPU has no fast bf16 matmuls

    config.workdir = "workdirs/demo"
    config.data.update(num_workers=0, read_threads=1)
    # Where Fashion-MNIST is read from. None: $LASADGEN_FASHION_MNIST, Debian's package, else the
    # subset in the package (lasadgen_jax/data/fashion_mnist.py). One setting for the tokenizer, the
    # extraction and a 'fashion_mnist:' FID reference: --config.prepare.fashion_mnist_root=DIR sets all three.
    fashion_mnist_root = placeholder(str)
    config.prepare = ml_collections.ConfigDict(dict(   # read by lasadgen_jax/demo.py, not the trainer
        vq=config_beside(__file__, "vq_small"),     # the tokenizer, trained first
        max_images=12000,                      # training images tokenized (x2 with flips)
        image_size=32, shard_size=10000, encode_batch_size=256,
        fashion_mnist_root=fashion_mnist_root,
    ))
    config.prepare.vq.data.fashion_mnist_root = fashion_mnist_root
    config.eval.fashion_mnist_root = fashion_mnist_root

    config.optimizer.update(learning_rate=1e-3, weight_decay=0.05, schedule="cosine", warmup_steps=50)
    config.batch_size = 32
    config.num_steps = 800
    config.ema_decay = 0.99
    config.checkpoint.update(every_steps=200, keep=2)
    config.log_every = 20
    config.sample.update(every_steps=400, classes=tuple(range(10)), per_class=8, cfg_scale=3.0)
    return config
