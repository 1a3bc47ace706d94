"""Linearization: fine-tune a LASAD model started from a trained softmax model's parameters.

    # a LlamaGen GPT (docs/llamagen.md): convert it, then train from it
    python -m lasadgen_jax.convert_llamagen --src c2i_B_256.pt --dst params/llamagen_B_256 --size B
    python -m lasadgen_jax.train --config=configs/linearize.py:size=B,attention=2d --workdir=DIR \\
        --config.init_from=params/llamagen_B_256 --config.data.tokens_dir=TOKENS
    # the Fashion-MNIST ablation's model (benchmarks/linearize.py runs this recipe in memory)
    --config=configs/linearize.py:base=ablation,attention=2d --config.init_from=SOFTMAX_WORKDIR

`arg`: comma-separated key=value of base ('imagenet256', the default; 'imagenet384' for LlamaGen's
384 px GPTs, a 24x24 grid; or 'ablation': the model of configs/ablation.py), size (ImageNet bases
only; LlamaGen's B, L, XL, XXL, 3B: must be the source's),
and attention (the LASAD variant to start: 2d, 2d_row, 1d, none).

config.init_from (a params directory, e.g. from lasadgen_jax.convert_llamagen, or a trainer workdir
with params_ema/) must be set: the trainer refuses config.freeze_non_attention_steps > 0 without it.
Every parameter of the source is copied except what a LASAD block adds (output gate, per-head output
norm, decays: fresh; lasadgen_jax/linearize.py says why that start is stable), and a source of
another size or vocabulary is refused. The source's model.json must agree on every shape-deciding
field but `attention`; for a LlamaGen conversion that means the ImageNet 256 model of the same size
(16x16 grid, codebook 16384, 1000 classes).

The recipe: for the first freeze_non_attention_steps updates only the attention blocks learn (the
copied MLPs, embeddings and head stay as trained while the new attention settles), then everything;
a short warm-up into a cosine decay at a lower peak learning rate than pretraining, since most of
the network starts trained. The numbers are starting points, not tuned results.
"""

import ml_collections

from lasadgen_jax.config_files import config_beside, config_knobs

KNOBS = {"base": "imagenet256", "size": "B", "attention": "2d"}
LASAD_VARIANTS = ("2d", "2d_row", "1d", "none")


def parse_arg(arg: str | None) -> dict:
    knobs = config_knobs(arg, KNOBS)
    if knobs["base"] not in ("imagenet256", "imagenet384", "ablation"):
        raise ValueError(f"config arg base={knobs['base']!r}: expected 'imagenet256', 'imagenet384' or 'ablation'")
    if knobs["attention"] not in LASAD_VARIANTS:
        raise ValueError(f"config arg attention={knobs['attention']!r}: linearization starts a LASAD variant, "
                         f"one of {LASAD_VARIANTS}")
    return knobs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    knobs = parse_arg(arg)
    if knobs["base"] == "ablation":
        config = config_beside(__file__, f"ablation:attention={knobs['attention']}")
        # 100 steps of 256 sequences after the ablation's 600: 1/6 of its budget, the first 20 with
        # only attention learning; half its peak learning rate.
        config.optimizer.update(learning_rate=3e-4, schedule="cosine", warmup_steps=10, end_learning_rate_fraction=0.0)
        config.num_steps = 100
        config.freeze_non_attention_steps = 20
        return config

    config = config_beside(__file__, f"{knobs['base']}:size={knobs['size']},attention={knobs['attention']}")
    # LlamaGen trains at a constant 1e-4 for 300 epochs (~1.5M steps of 256); 50k steps here, 2k of
    # them attention-only, warm-up 1k, cosine to a tenth.
    config.optimizer.update(learning_rate=1e-4, schedule="cosine", warmup_steps=1000, end_learning_rate_fraction=0.1)
    config.num_steps = 50000
    config.freeze_non_attention_steps = 2000
    config.checkpoint.every_steps = 2500
    return config
