"""The model: the LASAD attention block, the softmax baseline and the LASADGen decoder."""

from lasadgen_jax.models.lasad_attention import LASADAttention
from lasadgen_jax.models.lasadgen import SIZES, LASADGen, ModelConfig, model_config
from lasadgen_jax.models.softmax_attention import SoftmaxAttention

__all__ = ["SIZES", "LASADAttention", "LASADGen", "ModelConfig", "SoftmaxAttention", "model_config"]
