"""`impl="pallas_row_blocks"` (`2d`: the parallel form inside blocks of rows, column sweeps across
them; docs/lasad.md §9) on a GPU: checks, then time against cuDNN flash attention and
`pallas_parallel` in the same run.

    python benchmarks/row_blocks.py 2>&1 | tee row_blocks.txt
    python benchmarks/row_blocks.py --sizes 64,128 --tilings 16:0:4:2,16:64:4:2,32:32:4:2 --skip-check

1. Checks: forward and every gradient (q, k, v, both log decays, prefix) against the quadratic
   reference on small grids of several blocks (bf16 < 2e-2; float32 < 1e-4), then at
   --check-sizes against `pallas_parallel` (bf16 < 2e-2; the log-decay gradients against the sum
   of their terms' magnitudes, as benchmarks/linear_2d.py does), and that every output is finite.
2. Table: for each N (square grid, batch = tokens // N, H = 16, d = dv = 64, bf16), the median
   forward and forward+backward time of cuDNN flash (causal), `pallas_parallel` and
   `pallas_row_blocks` at each tiling (--tilings rows:dv_block:num_warps:num_stages), as ratios to flash.
Every line is printed as it is measured. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from kernels import compiled_pair, flash, random_inputs, rel_error, time_ms
from linear_2d import decay_scale, error_line

from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad import RowBlocks

START = time.perf_counter()


def row_blocks_op(grid, tiles: RowBlocks):
    return lambda x: lasad.lasad_attention_row_blocks(**x, grid=grid, variant="2d", blocks=tiles)


def impl_op(grid, impl):
    return lambda x: lasad.lasad_attention(**x, grid=grid, variant="2d", impl=impl)


def parse_tiling(text: str) -> RowBlocks:
    rows, dv_block, warps, stages = (int(part) for part in text.split(":"))
    return RowBlocks(rows=rows, dv_block=dv_block, num_warps=warps, num_stages=stages)


def compare(grid, inputs, cotangent, expected_impl, tiles):
    """(forward error, {gradient: error}, all finite) of pallas_row_blocks against expected_impl."""
    fwd, both, args = compiled_pair(impl_op(grid, expected_impl), inputs, cotangent)
    expected = (fwd(args), both(args)[1])
    fwd, both, args = compiled_pair(row_blocks_op(grid, tiles), inputs, cotangent)
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


def checks(check_sizes, tokens, heads, d, tilings) -> bool:
    ok = True
    print("| tiling | against | grid | batch | dtype | forward | dq | dk | dv | d log g_row | d log g_col | finite "
          "| ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs = [("reference", (40, 24), 1, jnp.float32, 1e-4, 2), ("reference", (33, 20), 2, jnp.bfloat16, 2e-2, 2),
            ("reference", (40, 24), 1, jnp.bfloat16, 2e-2, 0)]
    runs += [("pallas_parallel", (side, side), max(1, tokens // side**2), jnp.bfloat16, 2e-2, 0)
             for side in check_sizes]
    for tiles in tilings:
        for impl, grid, batch, dtype, tolerance, prefix in runs:
            head = f"| {tiles.rows}:{tiles.dv_block}:{tiles.num_warps}:{tiles.num_stages} | {impl} | " \
                   f"{grid[0]}x{grid[1]} | {batch} | {jnp.dtype(dtype).name}"
            try:
                inputs = random_inputs(batch, grid, heads if impl != "reference" else 2, d, prefix, dtype, seed=grid[1])
                cotangent = jax.random.normal(jax.random.PRNGKey(5), inputs["v"].shape, jnp.float32).astype(dtype)
                out_error, errors, finite = compare(grid, inputs, cotangent, impl, tiles)
            except Exception as error:  # noqa: BLE001 - reported, counted as a failed check, the run goes on
                print(f"{head} | {error_line(error)} | | | | | | | NO |", flush=True)
                ok = False
                continue
            good = finite and out_error < tolerance and max(errors.values()) < tolerance
            ok &= good
            cells = " | ".join(f"{errors[name]:.1e}" for name in ("q", "k", "v", "log_decay_row", "log_decay_col"))
            print(f"{head} | {out_error:.1e} | {cells} | {finite} | {'yes' if good else 'NO'} |", flush=True)
    return ok


def table(sizes, tokens, heads, d, repeats, tilings, budget):
    print("| N | grid | batch | impl | fwd ms | fwd+bwd ms | flash / fwd | flash / fwd+bwd | parallel / fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side in sizes:
        grid, n = (side, side), side * side
        batch = max(1, tokens // n)
        inputs = random_inputs(batch, grid, heads, d, 0, jnp.bfloat16, seed=side)
        cotangent = jax.random.normal(jax.random.PRNGKey(side + 1), inputs["v"].shape, jnp.float32).astype(jnp.bfloat16)
        plain = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"]}
        runs = [("cudnn flash", flash, plain), ("pallas_parallel", impl_op(grid, "pallas_parallel"), inputs)]
        runs += [(f"pallas_row_blocks {t.rows}:{t.dv_block}:{t.num_warps}:{t.num_stages}", row_blocks_op(grid, t),
                  inputs) for t in tilings]
        measured = {}
        for label, forward, args in runs:
            if time.perf_counter() - START > budget:
                print(f"| {n} | (budget of {budget} s spent: table stopped) | | | | | | | |", flush=True)
                return
            try:
                fwd, both, compiled_args = compiled_pair(forward, args, cotangent)
                ms = (time_ms(fwd, compiled_args, repeats), time_ms(both, compiled_args, repeats))
            except Exception as error:  # noqa: BLE001 - one tiling's failure must not lose the other rows
                print(f"| {n} | {side}x{side} | {batch} | {label} | {error_line(error)} | | | | |", flush=True)
                continue
            measured[label] = ms
            flash_ms, parallel_ms = measured.get("cudnn flash", ms), measured.get("pallas_parallel", ms)
            print(f"| {n} | {side}x{side} | {batch} | {label} | {ms[0]:.3f} | {ms[1]:.3f} | {flash_ms[0] / ms[0]:.2f} "
                  f"| {flash_ms[1] / ms[1]:.2f} | {parallel_ms[1] / ms[1]:.2f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,64,128", help="grid sides (N = side^2)")
    parser.add_argument("--check-sizes", default="64", help="grid sides checked against pallas_parallel")
    parser.add_argument("--tilings", default="16:0:4:2",
                        help="rows:dv_block:num_warps:num_stages, comma-separated (dv_block 0: the default rule)")
    parser.add_argument("--tokens", type=int, default=32768, help="batch * N per call")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds after which timing stops")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args(argv)
    try:
        tilings = [parse_tiling(text) for text in args.tilings.split(",") if text]
    except ValueError as error:
        parser.error(f"--tilings: {error}")
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, tokens {args.tokens}, heads {args.heads}, "
          f"d = dv = {args.dim}", flush=True)
    check_sizes = [int(s) for s in args.check_sizes.split(",") if s]
    ok = True if args.skip_check else checks(check_sizes, args.tokens, args.heads, args.dim, tilings[:1])
    print(f"checks {'passed' if ok else 'FAILED'} ({time.perf_counter() - START:.0f} s)", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    table(sizes, args.tokens, args.heads, args.dim, args.repeats, tilings, args.budget)
    print(f"done in {time.perf_counter() - START:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
