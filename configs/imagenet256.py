"""ImageNet 256x256 with VQ-16 tokens (a 16x16 grid): the LASADGen model.

    --config=configs/imagenet256.py                 # L-size, 2d attention
    --config=configs/imagenet256.py:size=XL,attention=softmax

`arg` is a comma-separated list of key=value for the named knobs below. Training fields join this
config with the trainer issue.
"""

import ml_collections

from lasadgen_jax.models.lasadgen import SIZES, model_config

KNOBS = {"size": "L", "attention": "2d"}


def parse_arg(arg: str | None) -> dict:
    knobs = dict(KNOBS)
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in KNOBS:
            raise ValueError(f"config arg {part!r}: expected key=value with key in {sorted(KNOBS)}")
        knobs[key] = value
    if knobs["size"] not in SIZES:
        raise ValueError(f"config arg size={knobs['size']!r}: expected one of {sorted(SIZES)}")
    return knobs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    knobs = parse_arg(arg)
    config = ml_collections.ConfigDict()
    model = model_config(knobs["size"], attention=knobs["attention"], grid=(16, 16), vocab_size=16384, num_classes=1000)
    config.model = ml_collections.ConfigDict(
        {field: getattr(model, field) for field in model.__dataclass_fields__}
    )
    return config
