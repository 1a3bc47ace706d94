"""The VQ image tokenizer: LlamaGen's VQ-16 architecture in Flax NNX, its checkpoint format and presets.

`python -m lasadgen_jax.tokenizer.convert` turns the public PyTorch checkpoint into a tokenizer
directory; `python -m lasadgen_jax.tokenizer.train` trains the small VQ of the CPU demo.
"""

from lasadgen_jax.tokenizer.architecture import PRESETS, VQ16, VQ_SMALL, VQArchitecture, preset
from lasadgen_jax.tokenizer.checkpoint import load_tokenizer, save_tokenizer, tokenizer_hash
from lasadgen_jax.tokenizer.model import VQModel

__all__ = ["PRESETS", "VQ16", "VQ_SMALL", "VQArchitecture", "VQModel", "load_tokenizer", "preset",
           "save_tokenizer", "tokenizer_hash"]
