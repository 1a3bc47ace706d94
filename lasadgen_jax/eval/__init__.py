"""Evaluation: the TF-FID InceptionV3 in Flax, ADM's FID / sFID / IS / precision / recall, reference statistics.

`python -m lasadgen_jax.eval.convert_inception --out DIR` converts the weights once;
`python -m lasadgen_jax.evaluate` computes the metrics (lasadgen_jax/evaluate.py; its library: scores.py).
"""
