"""ImageNet 384x384 with VQ-16 tokens (a 24x24 grid); otherwise as imagenet256.py (same `arg` knobs)."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("imagenet256", os.path.join(os.path.dirname(__file__), "imagenet256.py"))
_imagenet256 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_imagenet256)


def get_config(arg: str | None = None):
    config = _imagenet256.get_config(arg)
    config.model.grid = (24, 24)
    return config
