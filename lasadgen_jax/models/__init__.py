"""Model building blocks: the LASAD attention block (the LASADGen decoder is models/lasadgen.py)."""

from lasadgen_jax.models.lasad_attention import LASADAttention

__all__ = ["LASADAttention"]
