"""lasadgen_jax: class-conditional autoregressive image generation with LASAD attention, in JAX."""

__version__ = "0.1.0"
