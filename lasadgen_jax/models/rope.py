"""2D rotary position embedding over grid cells.

Half of each head's rotation frequencies follow the row, half the column (head dim divisible by 4).
Rotations use the split-half convention: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].
Prefix (condition) positions get angle 0, the identity rotation, as does cell (0, 0).

Which cell rotates which position is the attention's `rope_layout` (ROPE_LAYOUTS):
- "target" (this project's): the query that predicts cell a is rotated by cell a, the key of the
  token of cell m by cell m; prefix queries and keys by the identity (alignment.sequence_cells).
- "llamagen" (LlamaGen's GPT, for its converted checkpoints): a position's query and key are both
  rotated by the cell of the token at that position, so the query that predicts cell a by cell
  a-1; prefix positions have cos = sin = 0, which zeroes their queries and keys. Neither
  difference can be moved into the weights (the step from a token's cell to the next one's jumps
  at row ends, and zeroing only the prefix positions' keys depends on the position, which a
  projection cannot see), hence the option. LlamaGen pairs interleaved dims (2i, 2i+1) where this
  module pairs (i, i + head_dim/2), with the same angles: a fixed permutation of the q and k
  features, which the converter (convert_llamagen.py) applies to the weights.
"""

from __future__ import annotations

import jax.numpy as jnp

ROPE_LAYOUTS = ("target", "llamagen")


def rope_2d_angles(rows, cols, head_dim: int, base: float = 10000.0):
    """Angles [n, head_dim // 2] for cells (rows[i], cols[i]) (int arrays of length n)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = 1.0 / (base ** (jnp.arange(quarter, dtype=jnp.float32) / quarter))
    row_angles = rows.astype(jnp.float32)[:, None] * inv_freq[None, :]
    col_angles = cols.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([row_angles, col_angles], axis=-1)


def apply_rope(x, angles):
    """Rotates x [batch, n, heads, head_dim] by angles [n, head_dim // 2]; computed in float32."""
    half = x.shape[-1] // 2
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)

