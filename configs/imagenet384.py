"""ImageNet 384x384 with VQ-16 tokens (a 24x24 grid); otherwise as imagenet256.py."""

from configs.imagenet256 import get_config as _base_config


def get_config(arg: str | None = None):
    config = _base_config(arg)
    config.model.grid = (24, 24)
    return config
