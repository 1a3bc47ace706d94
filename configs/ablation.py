"""The attention ablation: one small LASADGen on Fashion-MNIST tokens of a 16x16 grid.

    python3 benchmarks/ablation.py run --bundle .ablation/bundle --variants 2d,2d_row,1d,none,softmax

benchmarks/ablation.py trains this model once per attention variant (`arg`: attention=NAME, the
only knob) with the same steps, batch, seed and data order, then measures test NLL, FID and speed.
The tokens come from the `configs/vq_small.py:grid16` tokenizer: 32x32 images -> 16x16 codes of
1024, the token count of ImageNet 256 with VQ-16. Everything else is as configs/imagenet256.py.
"""

import ml_collections

from lasadgen_jax.config_files import config_beside, config_knobs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    attention = config_knobs(arg, {"attention": "2d"})["attention"]
    config = config_beside(__file__, f"imagenet256:size=B,attention={attention}")
    # 8 layers of width 384 (6 heads of 64): 15.6M parameters with softmax attention.
    config.model.update(grid=(16, 16), vocab_size=1024, num_classes=10, dim=384, depth=8, num_heads=6,
                        class_dropout=0.1, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0,
                        dtype="bfloat16", param_dtype="float32")

    # 600 steps of 256 sequences: 39M tokens, 2.6 passes over the 60k training images.
    config.optimizer.update(learning_rate=6e-4, weight_decay=0.05, schedule="cosine", warmup_steps=60,
                            end_learning_rate_fraction=0.0)
    config.batch_size = 256
    config.num_steps = 600
    config.ema_decay = 0.999   # computed by the step; the ablation evaluates the final parameters
    config.seed = 0

    config.ablation = ml_collections.ConfigDict(dict(
        fid_samples=10000,            # FID at CFG 1 and at the sweep's best scale, vs the 10k test images
        sweep_samples=1000,           # per scale of the CFG sweep (a biased FID, only to pick the scale)
        cfg_sweep=(1.5, 2.0, 3.0),
        sample_batch=1000,            # sequences decoded at once (x2 with guidance)
        eval_batch=1000,              # test NLL
        log_every=100,
    ))
    return config
