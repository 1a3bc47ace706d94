"""The LASAD attention block (Flax NNX): projections, 2D RoPE, the LASAD op, output norm and gate.

Sequence convention: alignment.py. The query at position P-1+a predicts cell a, so it is rotated
by, and its decay measured from, cell a; the key at position P+m belongs to cell m. Prefix keys are
never decayed and prefix positions are not rotated. Decoding: `prefill` takes the P prefix
positions (its last output predicts cell 0), then `decode_step` for cells 1 .. N-1 takes the token
of cell a-1 and answers for cell a, carrying the LASAD state of `lasadgen_jax.ops.lasad` instead of
a KV cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lasadgen_jax import sharding
from lasadgen_jax.models import alignment, rope
from lasadgen_jax.models.remat_names import ATTENTION_INPUT_NAME, GATED_PRODUCT_NAME, LASAD_OUTPUT_NAME
from lasadgen_jax.ops import gated_norm, lasad


def initial_decays(num_heads: int, decay_range: tuple[float, float]) -> np.ndarray:
    """Per-head decays spread from decay_range[0] to decay_range[1], evenly in log(1 - g)."""
    low, high = decay_range
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"decay_range must satisfy 0 < low <= high < 1, got {decay_range}")
    return 1.0 - np.exp(np.linspace(np.log1p(-low), np.log1p(-high), num_heads))


class LASADAttention(nnx.Module):
    """q/k/v projections, optional 2D RoPE on q and k, LASAD, per-head RMSNorm, SiLU gate, output projection.

    Decays are learnable per head and parameterised in log space: log g = -exp(theta), so a decay
    stays in (0, 1) whatever the optimizer does.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        variant: str = "2d",
        use_rope: bool = True,
        rope_base: float = 10000.0,
        decay_range: tuple[float, float] = (0.5, 0.985),
        impl: str = "auto",
        decode_impl: str = "auto",
        gated_norm_impl: str = "auto",
        state_dtype: str = "float32",
        norm_eps: float = 1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        lasad.common.check_variant(variant)
        lasad.resolve_impl(impl)
        if decode_impl not in lasad.DECODE_IMPLS:
            raise ValueError(f"decode_impl must be one of {lasad.DECODE_IMPLS}, got {decode_impl!r}")
        lasad.recurrent.check_state_dtype(state_dtype)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        if use_rope and self.head_dim % 4:
            raise ValueError(f"use_rope needs a head dim divisible by 4, got {self.head_dim}")
        self.variant, self.use_rope, self.rope_base = variant, use_rope, rope_base
        self.impl, self.norm_eps, self.dtype = impl, norm_eps, dtype
        self.decode_impl, self.state_dtype = decode_impl, state_dtype
        gated_norm.resolve_impl(gated_norm_impl, head_dim=self.head_dim)
        self.gated_norm_impl = gated_norm_impl

        linear = lambda: nnx.Linear(dim, dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.out_proj = (linear() for _ in range(5))
        self.out_norm_scale = nnx.Param(jnp.ones((num_heads, self.head_dim), param_dtype))

        theta = np.log(-np.log(initial_decays(num_heads, decay_range))).astype(np.float32)
        uses_row, uses_col = lasad.common.USES_DECAY[variant]
        self.decay_row_theta = nnx.Param(jnp.asarray(theta)) if uses_row else None
        self.decay_col_theta = nnx.Param(jnp.asarray(theta)) if uses_col else None

    # ------------------------------------------------------------------ pieces

    def log_decays(self):
        """(log_decay_row, log_decay_col) as float32 [heads], None where the variant has none."""
        as_log = lambda theta: None if theta is None else -jnp.exp(theta[...].astype(jnp.float32))
        return as_log(self.decay_row_theta), as_log(self.decay_col_theta)

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def _query(self, x):
        """q, scaled by head_dim^-1/2, as [batch, seq, heads, head_dim]."""
        return self._heads(self.q_proj(x)) * jnp.asarray(self.head_dim**-0.5, self.dtype)

    def _keys_values(self, x):
        """k and v as [batch, seq, heads, head_dim]."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def _project(self, x):
        """q (scaled by head_dim^-1/2), k, v as [batch, seq, heads, head_dim], and the gate."""
        return self._query(x), *self._keys_values(x), self.gate_proj(x)

    def _rotate(self, x, rows, cols):
        if not self.use_rope:
            return x
        return rope.apply_rope(x, rope.rope_2d_angles(rows, cols, self.head_dim, self.rope_base))

    def _output(self, attended, gate, gated_norm_impl: str):
        """Per-head RMSNorm and SiLU gate (float32 arithmetic, ops/gated_norm), then the output projection.
        attended: [..., heads, head_dim]; gate: [..., dim]. The teacher-forced forward passes the layer's
        gated_norm_impl; prefill and decoding, a few tokens a call, pass "xla"."""
        gated = self._gated_norm(gated_norm_impl, attended.shape[0])(
            attended, gate.reshape(attended.shape), self.out_norm_scale[...])
        gated = gated.reshape(*gated.shape[:-2], self.dim)
        return self.out_proj(checkpoint_name(gated, GATED_PRODUCT_NAME))

    def _gated_norm(self, impl: str, batch: int):
        """gated_head_norm with `impl`; as `_lasad`, its kernels run per device under shard_map inside a
        mesh of several devices."""
        impl = gated_norm.resolve_impl(impl)
        norm = functools.partial(gated_norm.gated_head_norm, eps=self.norm_eps, out_dtype=self.dtype, impl=impl)
        mesh = jax.sharding.get_abstract_mesh()
        if impl == "xla" or mesh.empty or mesh.size == 1:
            return norm
        return sharding.per_device_head_norm(norm, mesh, batch, self.num_heads)

    @staticmethod
    def _prefix_causal(q, k, v):
        """Position p of the prefix sees prefix positions <= p, undecayed. [batch, P, heads, dv] float32."""
        scores = jnp.einsum("bihd,bjhd->bhij", q, k, preferred_element_type=jnp.float32)
        length = q.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, 0.0)
        return jnp.einsum("bhij,bjhe->bihe", scores.astype(v.dtype), v, preferred_element_type=jnp.float32)

    # ------------------------------------------------------------------ training / parallel forward

    def _lasad(self, grid):
        """lasad_attention for this layer. Inside a mesh of several devices (jax.set_mesh: the trainer's
        step) a Pallas kernel runs per device under shard_map (sharding.per_device_heads), since
        XLA cannot partition it; every other algorithm is left to XLA's partitioner."""
        op = functools.partial(lasad.lasad_attention, grid=grid, variant=self.variant, impl=self.impl)
        mesh = jax.sharding.get_abstract_mesh()
        impl = lasad.resolve_impl(self.impl, self.variant, tokens=grid[0] * grid[1])
        kernel = impl in lasad.KERNEL_IMPLS
        if mesh.empty or mesh.size == 1 or not kernel:
            return op

        def per_device(q, *args, **kwargs):
            return sharding.per_device_heads(op, mesh, q.shape[0], self.num_heads)(q, *args, **kwargs)

        return per_device

    def __call__(self, x, *, grid, num_prefix: int):
        """x: [batch, num_prefix + h*w - 1, dim] -> [batch, same, dim]."""
        h, w = alignment.check_sequence(x, self.dim, grid, num_prefix)
        query_rows, query_cols, _, _ = alignment.sequence_cells((h, w), num_prefix)
        q = self._rotate(self._query(x), query_rows, query_cols)
        prefix_k, prefix_v = self._keys_values(x[:, :num_prefix])
        # The cells' keys and values are projected from the cells' tokens with a zero row in the place
        # of cell N-1's (whose key is never read), so that the LASAD op reads the N cells as the matmuls
        # write them rather than padded copies (benchmarks/RESULTS.md, "Training step: the loss's gradient
        # in its forward pass, the cells' keys and values, ...").
        cell_k, cell_v = self._keys_values(jnp.pad(x[:, num_prefix:], ((0, 0), (0, 1), (0, 0))))
        cells = jnp.arange(h * w)
        cell_k = self._rotate(cell_k, cells // w, cells % w)
        cell_q, cell_k, cell_v = (checkpoint_name(t, ATTENTION_INPUT_NAME)
                                  for t in (q[:, num_prefix - 1:], cell_k, cell_v))
        log_decay_row, log_decay_col = self.log_decays()
        cell_out = checkpoint_name(self._lasad((h, w))(
            cell_q, cell_k, cell_v, log_decay_row=log_decay_row, log_decay_col=log_decay_col,
            prefix_k=prefix_k, prefix_v=prefix_v,
        ), LASAD_OUTPUT_NAME)
        before_last = slice(None, num_prefix - 1)
        prefix_out = self._prefix_causal(q[:, before_last], prefix_k[:, before_last], prefix_v[:, before_last])
        attended = jnp.concatenate([prefix_out.astype(cell_out.dtype), cell_out], axis=1)
        return self._output(attended, self.gate_proj(x), self.gated_norm_impl)

    # ------------------------------------------------------------------ decoding

    def init_decode_state(self, batch: int, *, grid, num_prefix: int = 1) -> dict:
        """An empty LASAD decode state for this block (stored in state_dtype; size independent of h); a
        short prefix of num_prefix positions is kept as key/value vectors (lasad.init_state)."""
        return lasad.init_state(batch, self.num_heads, self.head_dim, self.head_dim, grid=grid, variant=self.variant,
                                state_dtype=self.state_dtype, num_prefix=num_prefix)

    def prefill(self, x_prefix, state: dict, *, grid):
        """x_prefix: [batch, P, dim], the P prefix positions. Returns (outputs [batch, P, dim], state).

        The last output is the position that predicts cell 0.
        """
        lasad.common.check_grid(grid)
        if x_prefix.ndim != 3 or x_prefix.shape[-1] != self.dim:
            raise ValueError(f"x_prefix must be [batch, P, dim={self.dim}], got shape {x_prefix.shape}")
        q, k, v, gate = self._project(x_prefix)  # prefix positions and cell (0, 0) rotate by angle 0
        state = lasad.fold_prefix(state, k, v)
        return self._output(self._prefix_causal(q, k, v), gate, "xla"), state

    def decode_step(self, x, state: dict, cell, *, grid, row_start: bool | None = None):
        """x: [batch, dim], the token of cell-1 (position P-1+cell); cell >= 1, may be traced.

        row_start: whether cell starts a row, if known statically (see lasad.decode_step).
        Returns (output [batch, dim] for the position that predicts `cell`, new state).
        """
        _, w = lasad.common.check_grid(grid)
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [batch, dim={self.dim}], got shape {x.shape}")
        q, k, v, gate = self._project(x[:, None])
        query_row, query_col, key_row, key_col = alignment.decode_cells(cell, w)
        q, k = self._rotate(q, query_row, query_col), self._rotate(k, key_row, key_col)
        log_decay_row, log_decay_col = self.log_decays()
        out, state = lasad.decode(
            state, q[:, 0], k[:, 0], v[:, 0], cell, grid=grid, variant=self.variant,
            log_decay_row=log_decay_row, log_decay_col=log_decay_col, row_start=row_start, impl=self.decode_impl,
        )
        return self._output(out, gate[:, 0], "xla"), state
