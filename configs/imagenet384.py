"""ImageNet 384x384 with VQ-16 tokens (a 24x24 grid); otherwise as imagenet256.py (same `arg` knobs)."""

from lasadgen_jax.config_files import config_beside


def get_config(arg: str | None = None):
    config = config_beside(__file__, "imagenet256" + (f":{arg}" if arg else ""))
    config.model.grid = (24, 24)
    return config
