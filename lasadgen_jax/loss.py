"""The training loss: mean next-token cross-entropy over the VQ codebook, either from the model's full
logits (the plain path) or chunked over token positions, so that the float32 [batch, N, vocab] logits
never exist at once.

Chunked: the sequence axis is cut into chunks of `chunk_tokens` positions (the last one padded with
masked positions); each chunk's logits come from the final hidden states and the head weight exactly
as the head computes them (inputs in the head's dtype, bf16 in training, then float32), and the
logsumexp is float32. The loss is the step's last operation, so a custom VJP computes its gradients
in the same pass over the chunks as the loss: each chunk's logits give its logsumexp and then
softmax minus one-hot at once, the chunk's input gradient goes out, and the head weight's gradient is
accumulated in float32 over chunks; the backward only scales them by the loss's cotangent. No chunk's
logits are computed twice (benchmarks/RESULTS.md, "Training step: the loss's gradient in its forward
pass"). Without differentiation only the loss is computed.
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


def _logsumexp(logits):
    """float32 logsumexp over the vocabulary."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1)) + top[..., 0]


def _chunk_cross_entropy(features, kernel, targets, compute_dtype):
    """A chunk's float32 logits, the one-hot of its targets (a select, not a gather: vocab may be
    sharded), the logsumexp, and each token's cross-entropy (logsumexp minus the target's logit)."""
    logits = head_logits(features, kernel, compute_dtype)
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    lse = _logsumexp(logits)
    return logits, is_target, lse, lse - jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)


def _chunks(features, targets, chunk_tokens):
    n = features.shape[1]
    return _to_chunks(features, chunk_tokens), _to_chunks(targets, chunk_tokens), _chunk_masks(n, chunk_tokens)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_cross_entropy(features, kernel, targets, chunk_tokens, compute_dtype):
    """The loss alone (no gradients wanted)."""

    def one_chunk(loss_sum, chunk):
        x, t, mask = chunk
        token_loss = _chunk_cross_entropy(x, kernel, t, compute_dtype)[3]
        return loss_sum + jnp.sum(token_loss * mask), None

    loss_sum, _ = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32), _chunks(features, targets, chunk_tokens))
    return loss_sum / (features.shape[0] * features.shape[1])


def _loss_and_gradients(features, kernel, targets, chunk_tokens, compute_dtype):
    """The loss and, in the same pass over the chunks, its gradients for a cotangent of 1: in features
    (in their dtype) and in kernel (float32)."""
    n = features.shape[1]
    dtype = features.dtype if compute_dtype is None else compute_dtype
    scale = 1.0 / (features.shape[0] * n)

    def one_chunk(carry, chunk):
        loss_sum, kernel_grad = carry
        x, t, mask = chunk
        logits, is_target, lse, token_loss = _chunk_cross_entropy(x, kernel, t, compute_dtype)
        logits_grad = (jnp.exp(logits - lse[..., None]) - is_target) * (mask * scale)[..., None]
        logits_grad, x = logits_grad.astype(dtype), x.astype(dtype)
        x_grad = jnp.einsum("bcv,dv->bcd", logits_grad, kernel.astype(dtype), preferred_element_type=jnp.float32)
        kernel_grad = kernel_grad + jnp.einsum("bcd,bcv->dv", x, logits_grad, preferred_element_type=jnp.float32)
        return (loss_sum + jnp.sum(token_loss * mask), kernel_grad), x_grad.astype(features.dtype)

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    (loss_sum, kernel_grad), x_grads = jax.lax.scan(one_chunk, zeros, _chunks(features, targets, chunk_tokens))
    return loss_sum * scale, (_from_chunks(x_grads, n), kernel_grad)


def _forward_with_residuals(features, kernel, targets, chunk_tokens, compute_dtype):
    loss, (features_grad, kernel_grad) = _loss_and_gradients(features, kernel, targets, chunk_tokens, compute_dtype)
    return loss, (features_grad, kernel_grad.astype(kernel.dtype))


def _backward(chunk_tokens, compute_dtype, gradients, loss_cotangent):
    """The forward's gradients scaled by the loss's cotangent; targets get none."""
    scaled = lambda grad: (grad * loss_cotangent).astype(grad.dtype)
    features_grad, kernel_grad = gradients
    return scaled(features_grad), scaled(kernel_grad), None


_chunked_cross_entropy.defvjp(_forward_with_residuals, _backward)
