"""Model FLOPs per trained token and the devices' peak FLOP/s: the MFU estimate of the trainer and
of benchmarks/train_step.py."""

from __future__ import annotations

import jax
import ml_collections

from lasadgen_jax.models.lasadgen import ModelConfig

# Dense bf16 peak FLOP/s per chip, for the MFU estimate (config.peak_tflops_per_device overrides).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}


def train_flops_per_token(model_config: ModelConfig, block_tokens: int = 128) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward), for the MFU estimate.

    Matmuls with weights: 6 x their parameters. Token mixing per layer, forward: softmax (causal)
    2 x 2 x dim x N/2; LASAD 1d / none / 2d_row (chunked) the masked intra-block matmuls
    2 x 2 x dim x C/2 plus the state update and read 2 x 2 x dim x head_dim; exact 2d about
    8 x dim x head_dim (row fold, vertical update, column-state read; docs/lasad.md).
    """
    c = model_config
    head_dim = c.dim // c.num_heads
    projections = 4 if c.attention == "softmax" else 5  # q, k, v, (gate), out
    matmul_params = c.depth * (projections * c.dim * c.dim + 3 * c.dim * c.ffn_hidden) + c.dim * c.vocab_size
    tokens = c.num_tokens + c.num_prefix
    if c.attention == "softmax":
        mixing = 2 * 2 * c.dim * tokens / 2
    elif c.attention == "2d":
        mixing = 8 * c.dim * head_dim
    else:
        mixing = 2 * 2 * c.dim * min(block_tokens, tokens) / 2 + 2 * 2 * c.dim * head_dim
    return 6.0 * matmul_params + 3.0 * c.depth * mixing


def peak_flops_per_device(config: ml_collections.ConfigDict) -> float | None:
    """Peak FLOP/s of one device: config.peak_tflops_per_device, else PEAK_TFLOPS by device kind; None
    (no MFU) for a CPU or an unknown kind."""
    if config.peak_tflops_per_device is not None:
        return config.peak_tflops_per_device * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None  # CPU or unknown: no MFU
