"""LASAD self-check and benchmark of every algorithm: time and peak memory at N = 256, 1024, 4096.

    python benchmarks/lasad_ops.py                      # self-check, then the 2d benchmark
    python benchmarks/lasad_ops.py --variants 2d,1d --sizes 16,32 --impls chunked,reference

First every algorithm's forward and gradients are checked against the quadratic reference on a
small non-square grid with a prefix (the run stops with exit status 1 if one is off). Then each
algorithm is timed on square grids: forward and forward+backward, median of --repeats runs after a
warm-up, under jax.jit. Peak memory is XLA's own account of the compiled program (arguments +
outputs + temporaries), read from `compiled.memory_analysis()`. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad import autodiff, chunked

IMPLS = ("reference", "recurrent", "scan", "chunked", "parallel")


def random_inputs(batch, grid, heads, d, prefix, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    n = grid[0] * grid[1]
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    inputs = dict(
        q=normal(keys[0], (batch, n, heads, d)) * d**-0.5,
        k=normal(keys[1], (batch, n, heads, d)),
        v=normal(keys[2], (batch, n, heads, d)),
        log_decay_row=jax.random.uniform(keys[3], (heads,), minval=-0.7, maxval=-0.02),
        log_decay_col=jax.random.uniform(keys[4], (heads,), minval=-0.7, maxval=-0.02),
        prefix_k=normal(keys[5], (batch, prefix, heads, d)) if prefix else None,
        prefix_v=normal(keys[6], (batch, prefix, heads, d)) if prefix else None,
    )
    return inputs


def rel_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def loss_fn(grid, variant, impl):
    def loss(inputs):
        return jnp.sum(lasad.lasad_attention(**inputs, grid=grid, variant=variant, impl=impl).astype(jnp.float32) ** 2)

    return loss


def self_check(variants) -> bool:
    """Every algorithm against the reference (forward and all gradients) on a 5x7 grid with a prefix."""
    grid, ok = (5, 7), True
    print(f"Self-check on grid {grid[0]}x{grid[1]}, batch 2, 2 heads, d=8, prefix 2 (relative error vs reference):")
    print("| variant | impl | dtype | forward | gradients (worst input) | ok |")
    print("|---|---|---|---|---|---|")
    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        for variant in variants:
            inputs = random_inputs(2, grid, 2, 8, 2, dtype, seed=1)
            forward = lambda impl: jax.jit(
                functools.partial(lasad.lasad_attention, grid=grid, variant=variant, impl=impl))(**inputs)
            grads = lambda impl: jax.jit(jax.grad(loss_fn(grid, variant, impl)))(inputs)
            expected_out, expected_grads = forward("reference"), grads("reference")
            for impl in IMPLS[1:]:
                out_error = rel_error(forward(impl).astype(jnp.float32), expected_out.astype(jnp.float32))
                actual_grads = grads(impl)
                grad_error = max(
                    rel_error(actual_grads[name].astype(jnp.float32), expected_grads[name].astype(jnp.float32))
                    for name in actual_grads
                    if actual_grads[name] is not None and np.any(np.asarray(expected_grads[name]) != 0)
                )
                good = out_error < tolerance and grad_error < tolerance
                ok &= good
                print(f"| {variant} | {impl} | {jnp.dtype(dtype).name} | {out_error:.1e} | {grad_error:.1e} "
                      f"| {'yes' if good else 'NO'} |")
    return ok


def time_call(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up (compiled already)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_bytes(compiled):
    stats = compiled.memory_analysis()
    if stats is None:
        return float("nan")
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def softmax_baseline():
    """Causal softmax attention through jax.nn.dot_product_attention: cuDNN flash on GPU, XLA elsewhere."""
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"

    def attend(x):
        return jax.nn.dot_product_attention(x["q"], x["k"], x["v"], is_causal=True, implementation=implementation)

    return f"softmax ({implementation})", attend


def measure(forward, inputs, repeats):
    """(fwd ms, fwd+bwd ms, fwd MiB, fwd+bwd MiB) of forward(inputs) -> array, under jit."""
    loss = lambda x: jnp.sum(forward(x).astype(jnp.float32) ** 2)
    diff_inputs = {name: value for name, value in inputs.items() if value is not None}
    timings, memories = [], []
    for fn in (jax.jit(forward), jax.jit(jax.value_and_grad(loss))):
        compiled = fn.lower(diff_inputs).compile()
        timings.append(time_call(compiled, (diff_inputs,), repeats) * 1e3)
        memories.append(peak_bytes(compiled) / 2**20)
    return (*timings, *memories)


def benchmark(variants, impls, sides, batch, tokens, heads, d, dtype, repeats):
    print()
    baseline_name, baseline = softmax_baseline()
    batch_of = lambda side: max(1, tokens // (side * side)) if tokens else batch
    batches = ", ".join(f"N={side * side}: {batch_of(side)}" for side in sides)
    print(f"Benchmark: square grids, batch ({batches}), {heads} heads, d = dv = {d}, dtype {jnp.dtype(dtype).name}, "
          f"median of {repeats} after warm-up; memory = XLA's compiled arguments + outputs + temporaries; "
          f"'x softmax' = time / time of causal {baseline_name} on the same shapes in this run.")
    print("| variant | impl | grid | N | fwd ms | fwd+bwd ms | fwd x softmax | fwd+bwd x softmax "
          "| fwd MiB | fwd+bwd MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    baseline_times = {}
    for side in sides:
        inputs = random_inputs(batch_of(side), (side, side), heads, d, 0, dtype)
        qkv = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"]}
        fwd, both, fwd_mem, both_mem = measure(baseline, qkv, repeats)
        baseline_times[side] = (fwd, both)
        print(f"| - | {baseline_name} | {side}x{side} | {side * side} | {fwd:.2f} | {both:.2f} | 1 | 1 | "
              f"{fwd_mem:.0f} | {both_mem:.0f} |", flush=True)
    for variant in variants:
        for impl in impls:
            for side in sides:
                grid = (side, side)
                inputs = random_inputs(batch_of(side), grid, heads, d, 1, dtype)
                forward = lambda x, impl=impl, grid=grid, variant=variant: lasad.lasad_attention(
                    **x, grid=grid, variant=variant, impl=impl)
                fwd, both, fwd_mem, both_mem = measure(forward, inputs, repeats)
                base_fwd, base_both = baseline_times[side]
                print(f"| {variant} | {impl} | {side}x{side} | {side * side} | {fwd:.2f} | {both:.2f} | "
                      f"{fwd / base_fwd:.1f} | {both / base_both:.1f} | {fwd_mem:.0f} | {both_mem:.0f} |", flush=True)


def compare_chunked_backwards(variants, sides, batch, tokens, heads, d, dtype, repeats):
    """`chunked` with its chunk backward against the same forward with the recomputation backward
    (autodiff.py), on the cell part (no prefix): forward+backward ms of each."""
    print()
    print("`chunked`, forward+backward: chunk backward (the default) vs recomputation (no prefix)")
    print("| variant | grid | N | batch | chunk backward ms | recompute backward ms | recompute / chunk |")
    print("|---|---|---|---|---|---|---|")
    chunk = chunked.chunked_with_vjp()
    recompute = autodiff.with_recompute_vjp(chunked.chunked_cells)
    for variant in variants:
        for side in sides:
            grid, rows = (side, side), max(1, tokens // (side * side)) if tokens else batch
            inputs = {name: x for name, x in random_inputs(rows, grid, heads, d, 0, dtype).items() if x is not None}
            times = []
            for cells in (chunk, recompute):
                forward = lambda x, cells=cells, grid=grid, variant=variant: cells(
                    x["q"], x["k"], x["v"], x["log_decay_row"], x["log_decay_col"], grid, variant)
                times.append(measure(forward, inputs, repeats)[1])
            print(f"| {variant} | {side}x{side} | {side * side} | {rows} | {times[0]:.2f} | {times[1]:.2f} | "
                  f"{times[1] / times[0]:.2f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="2d", help="comma-separated LASAD variants to benchmark")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated algorithms to benchmark")
    parser.add_argument("--sizes", default="16,32,64", help="grid sides: 16,32,64 gives N = 256, 1024, 4096")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=0, help="if set, batch = tokens // N for each size (e.g. 32768)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head dim d = dv")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-check", action="store_true", help="skip the self-check")
    parser.add_argument("--compare-chunked-backward", action="store_true",
                        help="also time `chunked` with its chunk backward against the recomputation backward")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    impls = args.impls.split(",")
    for variant in variants:
        lasad.common.check_variant(variant)
    for impl in impls:
        lasad.resolve_impl(impl)
    sides = [int(s) for s in args.sizes.split(",")]

    device = jax.devices()[0]
    print(f"LASAD ops on {device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"python {platform.python_version()}, {datetime.date.today().isoformat()}")
    if not args.skip_check and not self_check(lasad.VARIANTS):
        print("Self-check FAILED: an algorithm disagrees with the reference.", file=sys.stderr)
        return 1
    benchmark(variants, impls, sides, args.batch, args.tokens, args.heads, args.dim, jnp.dtype(args.dtype),
              args.repeats)
    if args.compare_chunked_backward:
        compare_chunked_backwards(variants, sides, args.batch, args.tokens, args.heads, args.dim, jnp.dtype(args.dtype),
                                  args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
