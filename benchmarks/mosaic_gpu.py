"""The Mosaic GPU forward of the generic kernel (ops/lasad/pallas_mgpu.py, unfinished) on a Hopper GPU:
check it against `chunked`, then time it against the Triton kernel and cuDNN flash attention.

    python benchmarks/mosaic_gpu.py                       # N = 256 ... 16384, 1d, 2d_row, none
    python benchmarks/mosaic_gpu.py --sizes 16,64 --variants 1d --stages 2,3

Shapes as benchmarks/kernels.py: square grids, batch = tokens // N, H = 16, d = dv = 64, bf16.
Forward only (the Mosaic GPU body has no backward). A grid whose rows do not fit 64-slot chunks
(`2d_row` at N = 16384: 128-wide rows) is reported as skipped. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import sys

import jax
import jax.numpy as jnp

from kernels import random_inputs, rel_error, time_ms
from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad import pallas_mgpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16,32,64,128", help="grid sides (N = side^2)")
    parser.add_argument("--variants", default="1d,2d_row,none")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--stages", default="2", help="max_concurrent_steps values to time, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"this benchmark needs a GPU; jax's default backend is {jax.default_backend()!r}", file=sys.stderr)
        return 1
    stages = [int(s) for s in args.stages.split(",")]
    print(f"# Mosaic GPU LASAD forward on {jax.devices()[0].device_kind}, jax {jax.__version__}, python "
          f"{platform.python_version()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| N | variant | check vs chunked | flash fwd ms | triton fwd ms | " + " | ".join(
        f"mosaic (stages {s}) fwd ms" for s in stages) + " | triton / mosaic |")
    print("|---|---|---|---|---|" + "---|" * len(stages) + "---|")
    ok = True
    for side in (int(s) for s in args.sizes.split(",")):
        grid, n = (side, side), side * side
        x = random_inputs(max(1, args.tokens // n), grid, args.heads, args.dim, 0, jnp.bfloat16, seed=1)
        x = {name: value for name, value in x.items() if value is not None}
        flash = jax.jit(lambda y: jax.nn.dot_product_attention(y["q"], y["k"], y["v"], is_causal=True,
                                                               implementation="cudnn"))
        flash_ms = time_ms(flash, x, args.repeats)
        for variant in args.variants.split(","):
            reason = pallas_mgpu.unsupported(grid, variant, x["q"].dtype)
            if reason:
                print(f"| {n} | {variant} | skipped: {reason} |")
                continue
            mosaic = {s: jax.jit(lambda y, s=s: pallas_mgpu.forward(**y, grid=grid, variant=variant,
                                                                    max_concurrent_steps=s)) for s in stages}
            chunked = jax.jit(functools.partial(lasad.lasad_attention, grid=grid, variant=variant, impl="chunked"))
            error = rel_error(mosaic[stages[0]](x), chunked(**x))
            good = error < 2e-2
            ok &= good
            triton = jax.jit(functools.partial(lasad.lasad_attention, grid=grid, variant=variant, impl="pallas"))
            triton_ms = time_ms(lambda y: triton(**y), x, args.repeats)
            mosaic_ms = [time_ms(mosaic[s], x, args.repeats) for s in stages]
            print(f"| {n} | {variant} | {error:.1e} {'ok' if good else 'FAILED'} | {flash_ms:.3f} | {triton_ms:.3f} | "
                  + " | ".join(f"{ms:.3f}" for ms in mosaic_ms) + f" | {triton_ms / min(mosaic_ms):.2f} |", flush=True)
    print("ALL CHECKS PASSED" if ok else "SOME CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
