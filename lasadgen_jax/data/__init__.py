"""Datasets, token extraction and the grain input pipeline.

- `fashion_mnist`: the offline demo dataset (a subset in the package, or the full one where found).
- `sources`: ImageFolder / TFDS / Fashion-MNIST readers for extraction.
- `crops`, `records`, `manifest`, `sharded_encoder`, `extract`: `python -m lasadgen_jax.data.extract`.
- `pipeline`: `token_dataset` / `token_iterator`, yielding {"tokens": int32 [B, h*w], "label": int32 [B]}.
"""
