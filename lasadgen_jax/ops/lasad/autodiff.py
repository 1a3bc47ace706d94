"""Gradients for the LASAD algorithms without storing their states: a custom_vjp by recomputation.

Autodiff through a scan over tokens or blocks would keep every carried state (O(N d dv) for `1d`,
O(N w d dv / R) for `2d`). Instead the backward pass calls the same forward algorithm again:

    dq_a = sum_{m<a} D(a,m) (do_a . v_m) k_m     = forward(q=do, k=v, v=k)
    dk_m = sum_{a>m} D(a,m) (v_m . do_a) q_a     = flip(forward(q=flip v,  k=flip do, v=flip q))
    dv_m = sum_{a>m} D(a,m) (k_m . q_a) do_a     = flip(forward(q=flip k,  k=flip q,  v=flip do))

where flip reverses the token order, i.e. turns the grid by 180 degrees. That maps "a after m"
to "before" and keeps every decay: row and raster distances change sign together with the order,
and |c_a - c_m| is symmetric. The per-head log decays get their gradients by forward-mode
differentiation of the forward pass (one jvp per decay that the variant uses): heads are
independent, so a tangent of ones gives each head's own derivative, and nothing is stored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lasadgen_jax.ops.lasad import common


def recompute_backward(cells_fn, grid, variant, residuals, d_out):
    """The gradients (dq, dk, dv, d log_decay_row, d log_decay_col) of cells_fn at `residuals`
    (q, k, v, log_decay_row, log_decay_col) for the output cotangent d_out, by recomputation."""
    q, k, v, log_decay_row, log_decay_col = residuals
    run = functools.partial(cells_fn, log_decay_row=log_decay_row, log_decay_col=log_decay_col, grid=grid,
                            variant=variant)
    # The public op returns q.dtype, so d_out holds no more precision than that.
    d_out_in = d_out.astype(q.dtype)
    flip = lambda x: x[:, ::-1]
    dq = run(d_out_in, v, k)
    dk = flip(run(flip(v), flip(d_out_in), flip(q)))
    dv = flip(run(flip(k), flip(q), flip(d_out_in)))

    d_log_decay = [jnp.zeros_like(log_decay_row), jnp.zeros_like(log_decay_col)]
    used = [which for which in (0, 1) if common.USES_DECAY[variant][which]]
    if used:
        # One jvp per used decay, batched with vmap so that the primal pass is shared.
        out_of = lambda lr, lc: cells_fn(q, k, v, lr, lc, grid=grid, variant=variant)
        tangent_of = lambda onehot: jax.jvp(
            out_of, (log_decay_row, log_decay_col),
            (onehot[0] * jnp.ones_like(log_decay_row), onehot[1] * jnp.ones_like(log_decay_col)),
        )[1]
        onehots = jnp.eye(2, dtype=log_decay_row.dtype)[jnp.array(used)]
        d_out_d_decay = jax.vmap(tangent_of)(onehots)  # [len(used), B, N, H, dv]
        per_head = jnp.einsum("bnhe,ubnhe->uh", d_out.astype(d_out_d_decay.dtype), d_out_d_decay)
        for i, which in enumerate(used):
            d_log_decay[which] = per_head[i].astype(residuals[3 + which].dtype)

    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *d_log_decay)


def with_recompute_vjp(cells_fn):
    """Wraps cells_fn(q, k, v, log_decay_row, log_decay_col, *, grid, variant) -> float32 output.

    Returns f(q, k, v, log_decay_row, log_decay_col, grid, variant) with a custom_vjp whose
    backward stores only the inputs (recompute_backward). grid and variant are static.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def cells(q, k, v, log_decay_row, log_decay_col, grid, variant):
        return cells_fn(q, k, v, log_decay_row, log_decay_col, grid=grid, variant=variant)

    def forward(q, k, v, log_decay_row, log_decay_col, grid, variant):
        out = cells(q, k, v, log_decay_row, log_decay_col, grid, variant)
        return out, (q, k, v, log_decay_row, log_decay_col)

    def backward(grid, variant, residuals, d_out):
        return recompute_backward(cells_fn, grid, variant, residuals, d_out)

    cells.defvjp(forward, backward)
    return cells
