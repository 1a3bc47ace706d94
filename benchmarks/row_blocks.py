"""`impl="pallas_row_blocks"` (`2d`: the parallel form inside blocks of rows, column sweeps across
them; docs/lasad.md §9) on a GPU: checks, then time against cuDNN flash attention and
`pallas_parallel` in the same run.

    python benchmarks/row_blocks.py 2>&1 | tee row_blocks.txt
    python benchmarks/row_blocks.py --sizes 64,128 --tilings 16:0:4:2,16:64:4:2,32:32:4:2 --skip-check
    python benchmarks/row_blocks.py --sizes 64 --skip-check --profile /tmp/row_blocks_trace   # + top device ops

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

sys.path.insert(0, os.path.dirname(__file__))
from linear_2d import CHECK_HEADER, check_row, table

from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad import RowBlocks

START = time.perf_counter()


def row_blocks_op(grid, tiles: RowBlocks):
    return lambda x: lasad.lasad_attention_row_blocks(**x, grid=grid, variant="2d", blocks=tiles)


def parse_tiling(text: str) -> RowBlocks:
    rows, dv_block, warps, stages = (int(part) for part in text.split(":"))
    return RowBlocks(rows=rows, dv_block=dv_block, num_warps=warps, num_stages=stages)


def checks(check_sizes, tokens, heads, d, tilings) -> bool:
    print(CHECK_HEADER)
    runs = [("reference", (40, 24), 1, jnp.float32, 1e-4, 2), ("reference", (33, 20), 2, jnp.bfloat16, 2e-2, 2),
            ("reference", (40, 24), 1, jnp.bfloat16, 2e-2, 0)]
    runs += [("pallas_parallel", (side, side), max(1, tokens // side**2), jnp.bfloat16, 2e-2, 0)
             for side in check_sizes]
    ok = True
    for tiles in tilings:
        label = f"{tiles.rows}:{tiles.dv_block}:{tiles.num_warps}:{tiles.num_stages}"
        for run in runs:
            ok &= check_row(label, lambda grid: row_blocks_op(grid, tiles), *run, heads, d)
    return ok


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
    parser.add_argument("--profile", default=None, help="trace one more forward+backward call per table row into "
                        "this directory and print its top device operations (benchmarks/device_profile.py)")
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
    kernel_runs = lambda grid: [(f"pallas_row_blocks {t.rows}:{t.dv_block}:{t.num_warps}:{t.num_stages}",
                                 row_blocks_op(grid, t)) for t in tilings]
    table(sizes, args.tokens, args.heads, args.dim, args.repeats, kernel_runs, args.budget, args.profile)
    print(f"done in {time.perf_counter() - START:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
