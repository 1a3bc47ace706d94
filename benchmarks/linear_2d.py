"""The linear-time `2d` kernel (`impl="pallas_linear"`) on a GPU: checks, an optional tiling sweep,
then time against cuDNN flash attention and the parallel-form kernel in the same run, for each GPU
body (--bodies: "triton", the default body; "mosaic", LinearBlocks(gpu_body="mosaic"), Hopper only).

    python benchmarks/linear_2d.py 2>&1 | tee linear_2d.txt   # checks + table, both bodies (~4 min on an H100)
    python benchmarks/linear_2d.py --bodies mosaic --sizes 32,64 --skip-check

1. Checks, per body: forward and every gradient (q, k, v, both log decays, prefix) against the
   quadratic reference on small grids (5x7 batch 2 and 20x24, bf16 < 2e-2; with --float32-checks
   also float32 < 1e-4 for the Triton body: the Mosaic GPU body takes bf16/fp16 only), then at benchmark sizes against
   `pallas_parallel` at --check-sizes (bf16, < 2e-2; the log-decay gradients against the sum of their terms'
   magnitudes, as tests/test_lasad_pallas.py does), and that every output is finite.
2. Sweep (--sweep): LinearBlocks tilings of the Triton body at N = 4096, forward and forward+backward.
3. Table: for each N (square grid, batch = tokens // N, H = 16, d = dv = 64, bf16), the median
   forward and forward+backward time of cuDNN flash (causal), `pallas_parallel` and each body of
   `pallas_linear`, as ratios to flash.
Every line is printed as it is measured; a body that raises (e.g. the Mosaic GPU body on a grid
wider than 64) prints the error and the run goes on. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from kernels import compiled_pair, flash, random_inputs, rel_error, time_ms

from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad import LinearBlocks

START = time.perf_counter()
SWEEP = (LinearBlocks(rows=16, dv_block=16), LinearBlocks(rows=16, dv_block=64),
         LinearBlocks(rows=32, dv_block=64, num_warps=8))


BODIES = {"triton": LinearBlocks(), "mosaic": LinearBlocks(gpu_body="mosaic")}


def linear_op(grid, blocks=None):
    if blocks is None:
        return lambda x: lasad.lasad_attention(**x, grid=grid, variant="2d", impl="pallas_linear")
    return lambda x: lasad.lasad_attention_linear(**x, grid=grid, variant="2d", backend="gpu", blocks=blocks)


def error_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if str(error) else type(error).__name__


def reference_op(grid, impl):
    return lambda x: lasad.lasad_attention(**x, grid=grid, variant="2d", impl=impl)


def decay_scale(grid, inputs, cotangent, impl):
    """The log-decay gradients with inputs and cotangent by magnitude (the scale of their terms)."""
    absolute = {name: None if x is None or name.startswith("log_") else jnp.abs(x) for name, x in inputs.items()}
    absolute.update(log_decay_row=inputs["log_decay_row"], log_decay_col=inputs["log_decay_col"])
    _, both, args = compiled_pair(reference_op(grid, impl), absolute, jnp.abs(cotangent))
    return both(args)[1]


def compare(grid, inputs, cotangent, expected_impl, op):
    """(forward error, {gradient: error}, all finite) of `op` (a `2d` op of the inputs dict) against
    expected_impl; bf16 log-decay gradients against the sum of their terms' magnitudes."""
    fwd, both, args = compiled_pair(reference_op(grid, expected_impl), inputs, cotangent)
    expected = (fwd(args), both(args)[1])
    fwd, both, args = compiled_pair(op, inputs, cotangent)
    actual = (fwd(args), both(args)[1])
    finite = all(bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))) for x in (actual[0], *actual[1].values()))
    scale = decay_scale(grid, inputs, cotangent, expected_impl) if inputs["q"].dtype == jnp.bfloat16 else None
    errors = {}
    for name in expected[1]:
        if scale is not None and name.startswith("log_"):
            diff = np.linalg.norm(np.asarray(actual[1][name], np.float64) - np.asarray(expected[1][name], np.float64))
            errors[name] = float(diff / np.linalg.norm(np.asarray(scale[name], np.float64)))
        else:
            errors[name] = rel_error(actual[1][name], expected[1][name])
    return rel_error(actual[0], expected[0]), errors, finite


CHECK_HEADER = ("| kernel | against | grid | batch | dtype | forward | dq | dk | dv | d log g_row | d log g_col "
                "| finite | ok |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def check_row(label, op_of, impl, grid, batch, dtype, tolerance, prefix, heads, d) -> bool:
    """One row of the checks table: the `2d` op op_of(grid) against impl on fresh inputs (reference
    runs with 2 heads); prints the errors; False if a check fails or the op raises."""
    head = f"| {label} | {impl} | {grid[0]}x{grid[1]} | {batch} | {jnp.dtype(dtype).name}"
    try:
        inputs = random_inputs(batch, grid, heads if impl != "reference" else 2, d, prefix, dtype, seed=grid[1])
        cotangent = jax.random.normal(jax.random.PRNGKey(5), inputs["v"].shape, jnp.float32).astype(dtype)
        out_error, errors, finite = compare(grid, inputs, cotangent, impl, op_of(grid))
    except Exception as error:  # noqa: BLE001 - reported, counted as a failed check, the run goes on
        print(f"{head} | {error_line(error)} | | | | | | | NO |", flush=True)
        return False
    good = finite and out_error < tolerance and max(errors.values()) < tolerance
    cells = " | ".join(f"{errors[name]:.1e}" for name in ("q", "k", "v", "log_decay_row", "log_decay_col"))
    print(f"{head} | {out_error:.1e} | {cells} | {finite} | {'yes' if good else 'NO'} |", flush=True)
    return good


def checks(sizes, tokens, heads, d, bodies, float32: bool) -> bool:
    print(CHECK_HEADER)
    runs = [("reference", (5, 7), 2, jnp.bfloat16, 2e-2, 2), ("reference", (20, 24), 1, jnp.bfloat16, 2e-2, 2)]
    if float32:
        runs = [("reference", (5, 7), 2, jnp.float32, 1e-4, 2), ("reference", (20, 24), 1, jnp.float32, 1e-4, 2)] + runs
    runs += [("pallas_parallel", (side, side), max(1, tokens // side**2), jnp.bfloat16, 2e-2, 0) for side in sizes]
    ok = True
    for body in bodies:
        for run in runs:
            if body == "mosaic" and run[3] == jnp.float32:
                continue  # bf16/fp16 only (wgmma)
            ok &= check_row(body, lambda grid: linear_op(grid, BODIES[body]), *run, heads, d)
    return ok


def timed(forward, inputs, cotangent, repeats):
    fwd, both, args = compiled_pair(forward, inputs, cotangent)
    return time_ms(fwd, args, repeats), time_ms(both, args, repeats)


def sweep(tokens, heads, d, repeats, budget):
    side = 64
    inputs = random_inputs(tokens // side**2, (side, side), heads, d, 0, jnp.bfloat16, seed=1)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), inputs["v"].shape, jnp.float32).astype(jnp.bfloat16)
    print("| N | blocks | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|")
    results = []
    for blocks in SWEEP:
        if time.perf_counter() - START > budget:
            print(f"| (budget of {budget} s spent: sweep stopped) | | | |")
            break
        ms = timed(linear_op((side, side), blocks), inputs, cotangent, repeats)
        results.append((ms[1], blocks))
        print(f"| {side * side} | {blocks} | {ms[0]:.3f} | {ms[1]:.3f} |", flush=True)
    return min(results, key=lambda r: r[0])[1] if results else None


def table(sizes, tokens, heads, d, repeats, kernel_runs, budget, profile_dir=None):
    """kernel_runs(grid) -> [(label, op)]: the rows after cuDNN flash and pallas_parallel, each timed
    forward and forward+backward and given as ratios to both (benchmarks/row_blocks.py uses it too).
    profile_dir: trace one more forward+backward call per row there and print its top device
    operations (benchmarks/device_profile.py)."""
    print("| N | grid | batch | impl | fwd ms | fwd+bwd ms | flash / fwd | flash / fwd+bwd | parallel / fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side in sizes:
        grid, n = (side, side), side * side
        batch = max(1, tokens // n)
        inputs = random_inputs(batch, grid, heads, d, 0, jnp.bfloat16, seed=side)
        cotangent = jax.random.normal(jax.random.PRNGKey(side + 1), inputs["v"].shape, jnp.float32).astype(jnp.bfloat16)
        plain = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"]}
        runs = [("cudnn flash", flash, plain), ("pallas_parallel", reference_op(grid, "pallas_parallel"), inputs)]
        runs += [(label, op, inputs) for label, op in kernel_runs(grid)]
        measured = {}
        for label, forward, args in runs:
            if time.perf_counter() - START > budget:
                print(f"| {n} | (budget of {budget} s spent: table stopped) | | | | | | | |", flush=True)
                return
            try:
                fwd, both, compiled_args = compiled_pair(forward, args, cotangent)
                ms = time_ms(fwd, compiled_args, repeats), time_ms(both, compiled_args, repeats)
            except Exception as error:  # noqa: BLE001 - one kernel's failure must not lose the other rows
                print(f"| {n} | {side}x{side} | {batch} | {label} | {error_line(error)} | | | | |", flush=True)
                continue
            measured[label] = ms
            flash_ms, parallel_ms = measured.get("cudnn flash", ms), measured.get("pallas_parallel", ms)
            print(f"| {n} | {side}x{side} | {batch} | {label} | {ms[0]:.3f} | {ms[1]:.3f} | {flash_ms[0] / ms[0]:.2f} "
                  f"| {flash_ms[1] / ms[1]:.2f} | {parallel_ms[1] / ms[1]:.2f} |", flush=True)
            if profile_dir:
                from device_profile import format_summary, profile_device_ops

                run = lambda: jax.block_until_ready(both(compiled_args))
                directory = os.path.join(profile_dir, f"{n}_{re.sub(r'[^A-Za-z0-9]+', '_', label)}")
                print(format_summary(profile_device_ops(run, directory), f"N = {n}, {label}, forward+backward"),
                      flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bodies", default="triton,mosaic", help=f"pallas_linear GPU bodies, of {tuple(BODIES)}")
    parser.add_argument("--sizes", default="16,32,64,128", help="grid sides (N = side^2)")
    parser.add_argument("--check-sizes", default="32", help="grid sides checked against pallas_parallel")
    parser.add_argument("--tokens", type=int, default=32768, help="batch * N per call")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=200.0, help="seconds after which timing stops")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--profile", default=None, help="trace one more forward+backward call per table row into "
                        "this directory and print its top device operations (benchmarks/device_profile.py)")
    parser.add_argument("--float32-checks", action="store_true", help="also the float32 checks (Triton body)")
    parser.add_argument("--sweep", action="store_true", help="the Triton tiling sweep at N = 4096 first")
    parser.add_argument("--mosaic-rows", default="", help="more Mosaic GPU rows per chunk in the table, e.g. 1")
    args = parser.parse_args(argv)
    bodies = [body for body in args.bodies.split(",") if body]
    unknown = sorted(set(bodies) - set(BODIES))
    if unknown:
        parser.error(f"--bodies: unknown {unknown}, choose from {tuple(BODIES)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, tokens {args.tokens}, heads {args.heads}, "
          f"d = dv = {args.dim}, bodies {bodies}", flush=True)
    check_sizes = [int(s) for s in args.check_sizes.split(",") if s]
    ok = True if args.skip_check else checks(check_sizes, args.tokens, args.heads, args.dim, bodies,
                                                 args.float32_checks)
    print(f"checks {'passed' if ok else 'FAILED'} ({time.perf_counter() - START:.0f} s)", flush=True)
    linear_runs = [(body, BODIES[body]) for body in bodies]
    if args.sweep:
        best = sweep(args.tokens, args.heads, args.dim, args.repeats, args.budget)
        if best is not None and best != LinearBlocks():
            linear_runs.append((f"triton {best}", best))
    for rows in (int(r) for r in args.mosaic_rows.split(",") if r):
        linear_runs.append((f"mosaic rows {rows}", LinearBlocks(gpu_body="mosaic", mosaic_rows=rows)))
    kernel_runs = lambda grid: [(f"pallas_linear {label}", linear_op(grid, blocks)) for label, blocks in linear_runs]
    table(sizes, args.tokens, args.heads, args.dim, args.repeats, kernel_runs, args.budget, args.profile)
    print(f"done in {time.perf_counter() - START:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
