"""The training loss: mean next-token cross-entropy over the VQ codebook, either from the model's full
logits (the plain path) or chunked over token positions, so that the float32 [batch, N, vocab] logits
never exist at once.

Chunked: the sequence axis is cut into chunks of `chunk_tokens` positions (the last one padded with
masked positions); each chunk's logits come from the final hidden states and the head weight exactly
as the head computes them (inputs in the head's dtype, bf16 in training, then float32), and the
logsumexp is float32. A custom VJP keeps only the per-token logsumexp from the forward and, in the
backward, recomputes each chunk's logits and applies softmax minus one-hot directly: the chunk's
input gradient goes out at once, the head weight's gradient is accumulated in float32 over chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def next_token_loss(model, tokens, labels) -> jax.Array:
    """Mean cross-entropy of the model's predictions for `tokens` [batch, N] given `labels` [batch]:
    plain when model.config.loss_chunk_tokens is 0, else chunked (same value, same gradients)."""
    chunk_tokens = model.config.loss_chunk_tokens
    if chunk_tokens == 0:
        return optax.softmax_cross_entropy_with_integer_labels(model(tokens, labels), tokens).mean()
    features = model.hidden_states(tokens, labels)
    return chunked_cross_entropy(features, model.head.kernel[...], tokens, chunk_tokens, model.head.dtype)


def head_logits(features, kernel, compute_dtype) -> jax.Array:
    """The head's float32 logits: nnx.Linear without bias (inputs and weight in compute_dtype), then float32."""
    dtype = features.dtype if compute_dtype is None else compute_dtype
    return jnp.dot(features.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)


def chunked_cross_entropy(features, kernel, targets, chunk_tokens: int, compute_dtype=None) -> jax.Array:
    """Mean over [batch, N] of logsumexp(logits) - logits[target], logits = head_logits(features, kernel).

    features [batch, N, dim] (the head's input), kernel [dim, vocab], targets int [batch, N];
    chunk_tokens >= 1 positions per chunk (at most N are used), so a chunk's logits are
    [batch, chunk_tokens, vocab]. Differentiable in features and kernel.
    """
    if features.ndim != 3 or kernel.ndim != 2 or features.shape[-1] != kernel.shape[0]:
        raise ValueError(f"features must be [batch, N, dim] and kernel [dim, vocab], got {features.shape} and "
                         f"{kernel.shape}")
    if targets.shape != features.shape[:2] or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be int {features.shape[:2]}, got {targets.shape} {targets.dtype}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    chunk_tokens = min(chunk_tokens, features.shape[1])
    dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
    return _chunked_cross_entropy(features, kernel, targets, chunk_tokens, dtype)


# ----------------------------------------------------------------------------- chunks and the custom VJP


def _to_chunks(x, chunk_tokens: int):
    """[batch, N, ...] -> [num_chunks, batch, chunk_tokens, ...], N zero-padded to whole chunks."""
    batch, n = x.shape[:2]
    num_chunks = -(-n // chunk_tokens)
    padding = [(0, 0), (0, num_chunks * chunk_tokens - n)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, padding).reshape(batch, num_chunks, chunk_tokens, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(x, n: int):
    """[num_chunks, batch, chunk_tokens, ...] -> [batch, n, ...] (the padding dropped)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :n]


def _chunk_masks(n: int, chunk_tokens: int):
    """[num_chunks, 1, chunk_tokens] float32: 1 at real positions, 0 at the padding."""
    num_chunks = -(-n // chunk_tokens)
    return (jnp.arange(num_chunks * chunk_tokens) < n).astype(jnp.float32).reshape(num_chunks, 1, chunk_tokens)


def _logsumexp_and_target_logit(logits, targets):
    """float32 logsumexp over the vocabulary and the target's logit (a one-hot select: vocab may be sharded)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1)) + top[..., 0]
    one_hot = jnp.arange(logits.shape[-1]) == targets[..., None]
    return lse, jnp.sum(jnp.where(one_hot, logits, 0.0), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_cross_entropy(features, kernel, targets, chunk_tokens, compute_dtype):
    return _forward(features, kernel, targets, chunk_tokens, compute_dtype)[0]


def _forward(features, kernel, targets, chunk_tokens, compute_dtype):
    n = features.shape[1]

    def one_chunk(loss_sum, chunk):
        x, t, mask = chunk
        lse, target_logit = _logsumexp_and_target_logit(head_logits(x, kernel, compute_dtype), t)
        return loss_sum + jnp.sum((lse - target_logit) * mask), lse

    chunks = (_to_chunks(features, chunk_tokens), _to_chunks(targets, chunk_tokens), _chunk_masks(n, chunk_tokens))
    loss_sum, lse = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32), chunks)
    return loss_sum / (features.shape[0] * n), lse


def _forward_with_residuals(features, kernel, targets, chunk_tokens, compute_dtype):
    loss, lse = _forward(features, kernel, targets, chunk_tokens, compute_dtype)
    return loss, (features, kernel, targets, lse)


def _backward(chunk_tokens, compute_dtype, residuals, loss_cotangent):
    features, kernel, targets, lse = residuals
    n = features.shape[1]
    dtype = features.dtype if compute_dtype is None else compute_dtype
    scale = loss_cotangent / (features.shape[0] * n)

    def one_chunk(kernel_grad, chunk):
        x, t, mask, chunk_lse = chunk
        logits = head_logits(x, kernel, compute_dtype)
        one_hot = jnp.arange(logits.shape[-1]) == t[..., None]
        logits_grad = (jnp.exp(logits - chunk_lse[..., None]) - one_hot) * (mask * scale)[..., None]
        logits_grad, x = logits_grad.astype(dtype), x.astype(dtype)
        x_grad = jnp.einsum("bcv,dv->bcd", logits_grad, kernel.astype(dtype), preferred_element_type=jnp.float32)
        kernel_grad = kernel_grad + jnp.einsum("bcd,bcv->dv", x, logits_grad, preferred_element_type=jnp.float32)
        return kernel_grad, x_grad.astype(features.dtype)

    chunks = (_to_chunks(features, chunk_tokens), _to_chunks(targets, chunk_tokens), _chunk_masks(n, chunk_tokens),
              lse)
    kernel_grad, x_grads = jax.lax.scan(one_chunk, jnp.zeros(kernel.shape, jnp.float32), chunks)
    return _from_chunks(x_grads, n), kernel_grad.astype(kernel.dtype), None


_chunked_cross_entropy.defvjp(_forward_with_residuals, _backward)
