"""Model building blocks. The LASADGen decoder lands here with the model issue."""

from lasadgen_jax.models.lasad_attention import LASADAttention

__all__ = ["LASADAttention"]
