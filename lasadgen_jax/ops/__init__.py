"""Ops of lasadgen_jax. Each op lives in its own folder with its algorithms and their reference."""

from lasadgen_jax.ops.lasad import lasad_attention

__all__ = ["lasad_attention"]
