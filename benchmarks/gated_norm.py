"""The LASAD block's gated head norm (ops/gated_norm) on the GPU: the Pallas kernels against the XLA
form, checked and timed alone, forward and forward+backward, at the training step's shapes.

    python3 benchmarks/gated_norm.py                          # L and XL heads, 65,536 tokens (16x16, batch 256)
    python3 benchmarks/gated_norm.py --tokens 65536 --heads 16,20 --block_tokens 32,64,128

Inputs as the block gives them: the attention output and the gate projection in bf16, the scale in
float32, the output in bf16. Timing: median of `--repeats` runs of 5 back-to-back calls (kernels.py).
Checks: the kernels' output and three gradients against the XLA form's (relative error in the
Frobenius norm, kernels.py's rel_error). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import jax
import jax.numpy as jnp
from kernels import rel_error, time_ms

from lasadgen_jax.ops.gated_norm import GatedNormBlocks, gated_head_norm_pallas, gated_head_norm_reference

EPS = 1e-6
BOUND = 1e-2   # bf16 output and gradients against the XLA form's


def inputs(tokens: int, heads: int, head_dim: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (tokens, heads, head_dim), jnp.bfloat16)
    gate = jax.random.normal(keys[1], (tokens, heads, head_dim), jnp.bfloat16)
    scale = 1.0 + 0.1 * jax.random.normal(keys[2], (heads, head_dim), jnp.float32)
    cotangent = jax.random.normal(keys[3], (tokens, heads, head_dim), jnp.bfloat16)
    return x, gate, scale, cotangent


def compiled(norm, cotangent):
    """jitted forward and forward+backward (the three gradients) of `norm(x, gate, scale)`."""
    forward = jax.jit(lambda args: norm(*args))

    def loss(x, gate, scale):
        return jnp.sum(norm(x, gate, scale).astype(jnp.float32) * cotangent.astype(jnp.float32))

    both = jax.jit(lambda args: jax.grad(loss, argnums=(0, 1, 2))(*args))
    return forward, both


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", default="16,20", help="heads per layer (L: 16, XL: 20)")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--block_tokens", default="64", help="kernel tiles to time, e.g. 32,64,128")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"{device.device_kind}, jax {jax.__version__}, Python {platform.python_version()}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; tokens {args.tokens}, "
          f"head dim {args.head_dim}, bf16")
    xla = lambda x, gate, scale: gated_head_norm_reference(x, gate, scale, eps=EPS, out_dtype=jnp.bfloat16)
    ok = True
    print("\n| heads | impl | block tokens | fwd ms | fwd+bwd ms | fwd+bwd speed vs xla "
          "| rel error (out, dx, dgate, dscale) |")
    print("|---|---|---|---|---|---|---|")
    for heads in (int(h) for h in args.heads.split(",")):
        x, gate, scale, cotangent = inputs(args.tokens, heads, args.head_dim)
        forward, both = compiled(xla, cotangent)
        expected = (forward((x, gate, scale)), *both((x, gate, scale)))
        base = time_ms(both, (x, gate, scale), args.repeats)
        print(f"| {heads} | xla | - | {time_ms(forward, (x, gate, scale), args.repeats):.3f} | {base:.3f} | 1 | - |")
        for tile in (int(b) for b in args.block_tokens.split(",")):
            blocks = GatedNormBlocks(block_tokens=tile)
            kernel = lambda x, gate, scale, blocks=blocks: gated_head_norm_pallas(
                x, gate, scale, eps=EPS, out_dtype=jnp.bfloat16, blocks=blocks)
            forward_k, both_k = compiled(kernel, cotangent)
            actual = (forward_k((x, gate, scale)), *both_k((x, gate, scale)))
            errors = [rel_error(a, e) for a, e in zip(actual, expected)]
            finite = all(bool(jnp.all(jnp.isfinite(a))) for a in actual)
            ok &= finite and max(errors) <= BOUND
            timed = time_ms(both_k, (x, gate, scale), args.repeats)
            print(f"| {heads} | pallas | {tile} | {time_ms(forward_k, (x, gate, scale), args.repeats):.3f} | "
                  f"{timed:.3f} | {base / timed:.2f}x | {', '.join(f'{e:.1e}' for e in errors)}"
                  f"{'' if finite else ' NON-FINITE'} |", flush=True)
    print("\nALL CHECKS PASSED" if ok else "\nA CHECK FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
