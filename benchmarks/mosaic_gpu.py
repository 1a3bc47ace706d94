"""The Mosaic GPU kernels of the generic kernel (ops/lasad/kernels/chunk_mgpu.py: the forward and the
chunk backward's gradient step) on a Hopper GPU: check them against `chunked` and the Triton
kernels, then time forward and forward+backward against the Triton kernels and cuDNN flash.

    python benchmarks/mosaic_gpu.py                       # N = 256 ... 16384, 1d, 2d_row, none
    python benchmarks/mosaic_gpu.py --sizes 16,64 --variants 1d

Shapes as benchmarks/kernels.py: square grids, batch = tokens // N, H = 16, d = dv = 64, bf16.
`mosaic` is `lasad_attention_pallas(..., options=ChunkOptions(gpu_lowering="mosaic"))`: the
Mosaic GPU forward (one pass, or from `parallel_chunks` chunks on the Triton state pass and a
Mosaic GPU output pass; both are timed), the Triton state/adjoint passes, the Mosaic GPU gradient
step; `triton` ChunkOptions(gpu_lowering="triton"). Checks: forward and every gradient against
`chunked` and the Triton kernels, and every output element written (the Mosaic kernels cannot
alias a poisoned buffer, so forward and backward run again with v doubled: the output, dq, dk
and the decay gradients are linear in v, dv does not depend on it, and doubling is exact, so each
must be exactly twice, or equal to, the first). A grid whose
rows do not fit 64-slot chunks (`2d_row` at N = 16384: 128-wide rows) is reported as skipped.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import jax
import jax.numpy as jnp
from kernels import chunk_config, compiled_pair, flash, op, random_inputs, rel_error, time_ms

from lasadgen_jax.ops.lasad.kernels import chunk_mgpu

TOLERANCE = 2e-2  # bf16, as benchmarks/kernels.py


def worst(actual, expected):
    """(name, relative error) of the worst leaf of two gradient dicts."""
    errors = {name: rel_error(actual[name], expected[name]) for name in expected}
    name = max(errors, key=errors.get)
    return name, errors[name]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16,32,64,128", help="grid sides (N = side^2)")
    parser.add_argument("--variants", default="1d,2d_row,none")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"this benchmark needs a GPU; jax's default backend is {jax.default_backend()!r}", file=sys.stderr)
        return 1
    print(f"# Mosaic GPU LASAD kernels on {jax.devices()[0].device_kind}, jax {jax.__version__}, python "
          f"{platform.python_version()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# H={args.heads}, d=dv={args.dim}, bf16, batch*N = {args.tokens}; median of {args.repeats}; "
          "errors: relative, forward and worst gradient")
    print("| N | variant | mosaic vs chunked: fwd, worst grad | mosaic vs triton: worst grad | v doubled: off by "
          "| flash fwd / fwd+bwd ms | triton fwd / fwd+bwd ms | mosaic fwd / fwd+bwd ms "
          "| mosaic fwd 1-pass / 2-pass ms "
          "| triton / mosaic fwd+bwd | flash / mosaic fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for side in (int(s) for s in args.sizes.split(",")):
        grid, n = (side, side), side * side
        inputs = random_inputs(max(1, args.tokens // n), grid, args.heads, args.dim, 0, jnp.bfloat16, seed=1)
        cotangent = jax.random.normal(jax.random.PRNGKey(2), inputs["v"].shape, jnp.float32).astype(jnp.bfloat16)
        flash_fwd, flash_both, flash_args = compiled_pair(flash, inputs, cotangent)
        flash_ms = (time_ms(flash_fwd, flash_args, args.repeats), time_ms(flash_both, flash_args, args.repeats))
        for variant in args.variants.split(","):
            reason = chunk_mgpu.unsupported(grid, variant, jnp.bfloat16, args.dim, args.dim)
            if reason:
                print(f"| {n} | {variant} | skipped: {reason} |", flush=True)
                continue
            configs = (("mosaic", "pallas", chunk_config(gpu_lowering="mosaic")),  # first: fresh output buffers
                       ("chunked", "chunked", None), ("triton", "pallas", chunk_config(gpu_lowering="triton")),
                       ("mosaic 1-pass", "pallas", chunk_config(gpu_lowering="mosaic", parallel_chunks=1 << 30)),
                       ("mosaic 2-pass", "pallas", chunk_config(gpu_lowering="mosaic", parallel_chunks=1)))
            try:
                runs = {label: compiled_pair(op(grid, variant, impl, block), inputs, cotangent)
                        for label, impl, block in configs}
                results = {label: (fwd(x), both(x)[1]) for label, (fwd, both, x) in runs.items()}
                doubled = {label: (fwd({**x, "v": x["v"] * 2}), both({**x, "v": x["v"] * 2})[1])
                           for label, (fwd, both, x) in runs.items() if label.startswith("mosaic")}
            except Exception as failure:  # a lowering or compile error: report it, go on with the next
                ok = False
                print(f"| {n} | {variant} | FAILED {type(failure).__name__}: {str(failure)[:1500]!r} |", flush=True)
                continue
            fwd_error = max(rel_error(results[label][0], results["chunked"][0]) for label in doubled)
            grad_name, grad_error = worst(results["mosaic"][1], results["chunked"][1])
            triton_name, triton_error = worst(results["mosaic"][1], results["triton"][1])
            # every output element written: the output, dq, dk and the decay gradients are linear in v, dv
            # does not depend on it, and doubling is exact
            scale = lambda name: 1.0 if name == "v" else 2.0
            written = max(max(rel_error(doubled[label][0], 2 * results[label][0].astype(jnp.float32)),
                              *(rel_error(doubled[label][1][name], scale(name) * results[label][1][name].astype(
                                  jnp.float32)) for name in results[label][1]))
                          for label in doubled)
            good = max(fwd_error, grad_error, triton_error) < TOLERANCE and written == 0.0
            ok &= good
            ms = {label: (time_ms(fwd, x, args.repeats), time_ms(both, x, args.repeats))
                  for label, (fwd, both, x) in runs.items() if label != "chunked"}
            print(f"| {n} | {variant} | {fwd_error:.1e}, {grad_name} {grad_error:.1e} | {triton_name} "
                  f"{triton_error:.1e} | {written:.0e} {'ok' if good else 'FAILED'} | {flash_ms[0]:.3f} / "
                  f"{flash_ms[1]:.3f} | {ms['triton'][0]:.3f} / {ms['triton'][1]:.3f} | {ms['mosaic'][0]:.3f} / "
                  f"{ms['mosaic'][1]:.3f} | {ms['mosaic 1-pass'][0]:.3f} / {ms['mosaic 2-pass'][0]:.3f} | "
                  f"{ms['triton'][1] / ms['mosaic'][1]:.2f} | {flash_ms[1] / ms['mosaic'][1]:.2f} |", flush=True)
    print("ALL CHECKS PASSED" if ok else "SOME CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
