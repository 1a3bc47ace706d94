"""Causal softmax attention with 2D RoPE and a KV cache: the LlamaGen-style baseline (Flax NNX).

Same interface and sequence convention (alignment.py) as LASADAttention, so a model swaps one for
the other by config. Training goes through `jax.nn.dot_product_attention` with the implementation
`resolve_softmax_impl` picks (cuDNN flash attention on a GPU for bf16/fp16; XLA's elsewhere).
Decoding keeps every key and value: a cache of
[batch, P + N - 1, heads, head_dim] twice, which grows with the image, unlike the LASAD state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lasadgen_jax.models import alignment, rope
from lasadgen_jax.models.remat_names import ATTENTION_INPUT_NAME
from lasadgen_jax.ops.lasad import common

SOFTMAX_IMPLS = ("auto", "xla", "cudnn")
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_softmax_impl(impl: str, dtype, head_dim: int, backend: str | None = None) -> str:
    """The implementation of jax.nn.dot_product_attention for these inputs: 'xla' or 'cudnn'.

    'auto' is cuDNN flash attention on a GPU for bf16/fp16 inputs with a head dim it takes (a multiple
    of 8, at most 128), XLA's otherwise. It is named explicitly because the function's own default
    (implementation=None) is XLA's, which keeps the float32 [batch, heads, N, N] scores for the
    backward: at 64x64 tokens they outgrow any GPU (benchmarks/RESULTS.md, "Training step: the L
    model on one H100 — 2026-12-06").
    """
    if impl not in SOFTMAX_IMPLS:
        raise ValueError(f"softmax_impl must be one of {SOFTMAX_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend() if backend is None else backend
    takes = jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if backend == "gpu" and takes else "xla"


class SoftmaxAttention(nnx.Module):
    """q/k/v/o projections (no bias), optional 2D RoPE, causal softmax attention.

    rope_layout (rope.py): "target" rotates a query by the cell it predicts; "llamagen" by its own
    token's cell, with the prefix positions' queries and keys zeroed, as LlamaGen's GPT does.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        use_rope: bool = True,
        rope_base: float = 10000.0,
        rope_layout: str = "target",
        impl: str = "auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        if use_rope and self.head_dim % 4:
            raise ValueError(f"use_rope needs a head dim divisible by 4, got {self.head_dim}")
        if rope_layout not in rope.ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {rope.ROPE_LAYOUTS}, got {rope_layout!r}")
        if rope_layout != "target" and not use_rope:
            raise ValueError(f"rope_layout {rope_layout!r} needs use_rope=True")
        resolve_softmax_impl(impl, dtype, self.head_dim)   # checks the name
        self.use_rope, self.rope_base, self.rope_layout, self.dtype = use_rope, rope_base, rope_layout, dtype
        self.impl = impl
        linear = lambda: nnx.Linear(dim, dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (linear() for _ in range(4))

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def _rotate(self, x, rows, cols):
        if not self.use_rope:
            return x
        return rope.apply_rope(x, rope.rope_2d_angles(rows, cols, self.head_dim, self.rope_base))

    @staticmethod
    def _zero_prefix(x, num_prefix: int):
        """x [batch, n, heads, head_dim] with its first num_prefix positions zeroed (LlamaGen's prefix rotation)."""
        return x.at[:, :num_prefix].set(0)

    def _merge_heads(self, x):
        return self.out_proj(x.reshape(*x.shape[:-2], self.dim).astype(self.dtype))

    def __call__(self, x, *, grid, num_prefix: int):
        """x: [batch, num_prefix + h*w - 1, dim] -> [batch, same, dim]."""
        h, w = alignment.check_sequence(x, self.dim, grid, num_prefix)
        query_rows, query_cols, key_rows, key_cols = alignment.sequence_cells((h, w), num_prefix)
        if self.rope_layout == "llamagen":
            query_rows, query_cols = key_rows, key_cols
        q = self._rotate(self._heads(self.q_proj(x)), query_rows, query_cols)
        k = self._rotate(self._heads(self.k_proj(x)), key_rows, key_cols)
        if self.rope_layout == "llamagen":
            q, k = self._zero_prefix(q, num_prefix), self._zero_prefix(k, num_prefix)
        q, k = checkpoint_name(q, ATTENTION_INPUT_NAME), checkpoint_name(k, ATTENTION_INPUT_NAME)
        v = self._heads(self.v_proj(x))
        return self._merge_heads(self._attend(q, k, v))

    def _attend(self, q, k, v):
        """Causal attention of [batch, n, heads, head_dim] inputs by the resolved implementation."""
        impl = resolve_softmax_impl(self.impl, q.dtype, self.head_dim)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    # ------------------------------------------------------------------ decoding with a KV cache

    def init_decode_state(self, batch: int, *, grid, num_prefix: int = 1) -> dict:
        """Zeroed key and value caches of [batch, num_prefix + h*w - 1, heads, head_dim]."""
        h, w = common.check_grid(grid)
        shape = (batch, num_prefix + h * w - 1, self.num_heads, self.head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def prefill(self, x_prefix, state: dict, *, grid):
        """x_prefix: [batch, P, dim]. Writes the prefix into the cache; returns (outputs [batch, P, dim], state)."""
        common.check_grid(grid)
        if x_prefix.ndim != 3 or x_prefix.shape[-1] != self.dim:
            raise ValueError(f"x_prefix must be [batch, P, dim={self.dim}], got shape {x_prefix.shape}")
        q, k, v = (self._heads(proj(x_prefix)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        length = x_prefix.shape[1]
        if self.rope_layout == "llamagen":
            q, k = self._zero_prefix(q, length), self._zero_prefix(k, length)
        # "target": prefix positions unrotated. XLA's attention: P (the class prefix) is a handful of tokens.
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        state = {
            "k": state["k"].at[:, :length].set(k.astype(state["k"].dtype)),
            "v": state["v"].at[:, :length].set(v.astype(state["v"].dtype)),
        }
        return self._merge_heads(out), state

    def decode_step(self, x, state: dict, cell, *, grid, row_start: bool | None = None):
        """x: [batch, dim], the token of cell-1; returns (output [batch, dim] predicting `cell`, state).

        row_start is accepted for the interface LASADAttention shares; a KV cache has no rows.
        """
        del row_start
        h, w = common.check_grid(grid)
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [batch, dim={self.dim}], got shape {x.shape}")
        num_prefix = state["k"].shape[1] - h * w + 1
        position = num_prefix - 1 + jnp.asarray(cell)
        query_row, query_col, key_row, key_col = alignment.decode_cells(cell, w)
        if self.rope_layout == "llamagen":
            query_row, query_col = key_row, key_col
        x = x[:, None]
        q = self._rotate(self._heads(self.q_proj(x)), query_row, query_col)
        k = self._rotate(self._heads(self.k_proj(x)), key_row, key_col)
        v = self._heads(self.v_proj(x))
        state = {
            "k": jax.lax.dynamic_update_slice_in_dim(state["k"], k.astype(state["k"].dtype), position, axis=1),
            "v": jax.lax.dynamic_update_slice_in_dim(state["v"], v.astype(state["v"].dtype), position, axis=1),
        }
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, state["k"], preferred_element_type=jnp.float32)
        scores = scores * self.head_dim**-0.5
        visible = jnp.arange(state["k"].shape[1]) <= position
        scores = jnp.where(visible[None, None, None, :], scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(state["v"].dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, state["v"], preferred_element_type=jnp.float32)
        return self._merge_heads(out[:, 0]), state
