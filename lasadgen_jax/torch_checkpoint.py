"""PyTorch checkpoint files read as data: `torch.load(..., weights_only=True)`, never unpickled code.

Shared by the converters (tokenizer/convert.py, convert_llamagen.py); torch is imported only here,
when a checkpoint is read (it is the optional extra `[torch]`).
"""

from __future__ import annotations

import os

import numpy as np


def _torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError("the converter needs PyTorch: pip install 'lasadgen_jax[torch]'") from error
    return torch


def load_checkpoint(path: str) -> dict:
    """The top-level dict of a PyTorch checkpoint, loaded with weights_only=True (tensors and plain containers)."""
    torch = _torch()
    if not os.path.isfile(path):
        raise ValueError(f"--src {path!r} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError (or RuntimeError) for non-tensor content
        raise ValueError(f"--src {path!r} could not be loaded with weights_only=True (it holds more than "
                         f"tensors, or is not a PyTorch checkpoint): {error}") from error
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"--src {path!r} holds {type(checkpoint).__name__} {str(checkpoint)[:40]!r}, not a dict of "
                         f"tensors")
    return checkpoint


def is_tensor(value) -> bool:
    return isinstance(value, _torch().Tensor)


def float32_arrays(state_dict: dict, path: str, where: str) -> dict[str, np.ndarray]:
    """{name: float32 numpy array} of a state_dict whose every entry must be a tensor."""
    not_tensors = [name for name, value in state_dict.items() if not is_tensor(value)]
    if not_tensors:
        raise ValueError(f"--src {path!r}: entries {not_tensors[:5]} {where} are not tensors")
    torch = _torch()
    return {name: value.detach().to(torch.float32).numpy() for name, value in state_dict.items()}
