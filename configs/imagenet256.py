"""ImageNet 256x256 with VQ-16 tokens (a 16x16 grid): LASADGen and LlamaGen's training recipe.

    python -m lasadgen_jax.train --config=configs/imagenet256.py --workdir=DIR \\
        --config.data.tokens_dir=TOKENS [--config.tokenizer_dir=VQ16_DIR]
    --config=configs/imagenet256.py:size=XL,attention=softmax

`arg` is a comma-separated list of key=value for the named knobs below; any field can be overridden
with --config.field=value (the config is locked: a misspelt field is an error).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from lasadgen_jax.config_files import config_knobs
from lasadgen_jax.models.lasadgen import SIZES, model_config
from lasadgen_jax.sharding import DEFAULT_RULES

KNOBS = {"size": "L", "attention": "2d"}


def parse_arg(arg: str | None) -> dict:
    knobs = config_knobs(arg, KNOBS)
    if knobs["size"] not in SIZES:
        raise ValueError(f"config arg size={knobs['size']!r}: expected one of {sorted(SIZES)}")
    return knobs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    knobs = parse_arg(arg)
    config = ml_collections.ConfigDict()
    # The training-step levers that let LlamaGen's batch of 256 fit one 80 GB GPU: block remat keeping the
    # matmul outputs and the attention's inputs and outputs (the fastest policy that fits: "Training step:
    # what remat keeps of the attention") and the chunked loss; the layers stay a Python loop, since the
    # scan made the step 1.14-1.36x slower ("Training step: the L model on one GPU, profiled"); both
    # sections in benchmarks/RESULTS.md.
    model = model_config(knobs["size"], attention=knobs["attention"], grid=(16, 16), vocab_size=16384,
                         num_classes=1000, dtype="bfloat16", param_dtype="float32",
                         remat="dots_attention_inputs", loss_chunk_tokens=64, scan_layers=False)
    config.model = ml_collections.ConfigDict({field: getattr(model, field) for field in model.__dataclass_fields__})

    config.workdir = placeholder(str)         # or --workdir
    config.data = ml_collections.ConfigDict(dict(
        tokens_dir=placeholder(str),           # python -m lasadgen_jax.data.extract --out=...
        num_workers=2, read_threads=2, prefetch_batches=4,
        skip_corrupt_records=False,            # True: skip (log and count) records that fail to read
    ))
    config.tokenizer_dir = placeholder(str)   # VQ-16 directory: decodes the sample grids into images

    # LlamaGen c2i: AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.05 on matrices, clip 1.0,
    # global batch 256, 300 epochs, constant learning rate, class dropout 0.1 (in config.model).
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, grad_clip_norm=1.0,
        schedule="constant", warmup_steps=0, end_learning_rate_fraction=0.1))
    config.batch_size = 256                   # global, over all processes and devices
    config.grad_accum_steps = 1
    config.num_epochs = 300
    config.num_steps = placeholder(int)       # overrides num_epochs
    config.ema_decay = 0.9999
    # A step whose loss, gradient or updated state is not finite is skipped; this many in a row end the run.
    config.max_consecutive_skips = 5
    config.seed = 0
    # Start a new run (never a resume) from another model's parameters: a params directory or a trainer
    # workdir; a LASAD model from a softmax one copies all but the LASAD-only parameters
    # (lasadgen_jax/linearize.py, docs/training.md). For the first freeze_non_attention_steps updates
    # only the attention blocks' parameters move (lasadgen_jax/optimizer.py).
    config.init_from = placeholder(str)
    config.freeze_non_attention_steps = 0

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))   # -1: the remaining devices
    config.sharding_rules = DEFAULT_RULES
    config.distributed = ml_collections.ConfigDict(dict(
        initialize="auto", coordinator_address=placeholder(str), num_processes=placeholder(int),
        process_id=placeholder(int)))

    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=5000, keep=3, async_save=True))
    config.log_every = 100
    config.peak_tflops_per_device = placeholder(float)   # MFU denominator; default by device kind
    config.sample = ml_collections.ConfigDict(dict(
        every_steps=20000, classes=(207, 360, 387, 974, 88, 979, 417, 279), per_class=4,
        cfg_scale=4.0, temperature=1.0, top_k=0, top_p=1.0))
    # Periodic FID/sFID/precision/recall from the EMA params on a small N (0: off). Needs converted
    # Inception weights (python -m lasadgen_jax.eval.convert_inception) and a reference
    # (ADM's VIRTUAL_imagenet256_labeled.npz, or 'fashion_mnist:test' for the demo, read from
    # fashion_mnist_root: None is the default locations of lasadgen_jax/data/fashion_mnist.py).
    config.eval = ml_collections.ConfigDict(dict(
        every_steps=0, num_samples=5000, reference=placeholder(str), inception=placeholder(str),
        fashion_mnist_root=placeholder(str),
        metrics="fid,sfid,precision,recall", cfg_scale=1.5, batch_size=64, feature_batch_size=200))
    return config
