"""The LASAD Pallas kernels on a GPU: correctness at full size, then time against cuDNN flash attention.

    python benchmarks/kernels.py                     # checks, then the table (N = 256 ... 16384)
    python benchmarks/kernels.py --extras --budget 380   # then other tilings (fwd, fwd+bwd), until 380 s
    python benchmarks/kernels.py --sizes 16,32 --variants 1d --skip-check
    python benchmarks/kernels.py --variants 2d --backward-2d refwd,sweep   # both 2d backwards side by side

1. Ceilings measured in this run: a bf16 8192^3 matmul (TFLOP/s) and a device copy (GB/s).
2. Checks: every variant's `impl="pallas"` forward and gradients against the quadratic reference
   on small grids (float32 and bf16, with prefix keys, non-square); then at every benchmark size
   the kernel against the pure-XLA `chunked` algorithm (forward and all gradients, bf16), and
   that it writes every output element: a Triton kernel's output buffer poisoned with NaN first, a
   Mosaic GPU kernel's output for v doubled compared with twice its output (`written_check`).
   Row "pallas" is the default chunk kernel (ChunkOptions.gpu_lowering "auto": Mosaic GPU on a
   Hopper GPU where it applies), "pallas triton" the all-Triton kernels.
3. Table: for each N (square grid, batch = tokens // N), the median forward and forward+backward
   time of cuDNN flash attention (causal), the `chunked` algorithm and the Pallas kernel of each
   variant, as ratios to flash in the same run; GB/s of the forward's compulsory traffic (q, k, v
   read, out written) against the copy ceiling. `--backward-2d` picks the `2d` kernel's backward(s)
   (`ChunkOptions.backward_2d`): `refwd` (the default, row "pallas") and/or `sweep` (row "pallas sweep").
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lasadgen_jax.ops import lasad
from lasadgen_jax.ops.lasad import BlockSizes, ChunkOptions, ParallelBlocks
from lasadgen_jax.ops.lasad.kernels import chunk, parallel_form

DIFF = ("q", "k", "v", "log_decay_row", "log_decay_col", "prefix_k", "prefix_v")


def random_inputs(batch, grid, heads, d, prefix, dtype, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    n = grid[0] * grid[1]
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
    return dict(
        q=normal(keys[0], (batch, n, heads, d)) * jnp.asarray(d**-0.5, dtype),
        k=normal(keys[1], (batch, n, heads, d)),
        v=normal(keys[2], (batch, n, heads, d)),
        log_decay_row=jax.random.uniform(keys[3], (heads,), minval=-0.7, maxval=-0.02),
        log_decay_col=jax.random.uniform(keys[4], (heads,), minval=-0.7, maxval=-0.02),
        prefix_k=normal(keys[5], (batch, prefix, heads, d)) if prefix else None,
        prefix_v=normal(keys[6], (batch, prefix, heads, d)) if prefix else None,
    )


def rel_error(actual, expected):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


class ChunkConfig(NamedTuple):
    """One configuration of the chunk kernel: its tiles and its options."""

    tiles: BlockSizes
    options: ChunkOptions


def chunk_config(**fields) -> ChunkConfig:
    """A ChunkConfig from BlockSizes and ChunkOptions fields, each to the dataclass that has it."""
    option_names = {field.name for field in dataclasses.fields(ChunkOptions)}
    return ChunkConfig(BlockSizes(**{name: value for name, value in fields.items() if name not in option_names}),
                       ChunkOptions(**{name: value for name, value in fields.items() if name in option_names}))


def op(grid, variant, impl, block=None):
    if impl == "pallas_parallel" and block is not None:
        return lambda x: lasad.lasad_attention_parallel(**x, grid=grid, variant=variant, blocks=block)
    if impl == "pallas" and block is not None:
        return lambda x: lasad.lasad_attention_pallas(**x, grid=grid, variant=variant, backend="gpu",
                                                      block_sizes=block.tiles, options=block.options)
    return lambda x: lasad.lasad_attention(**x, grid=grid, variant=variant, impl=impl)


def flash(x):
    return jax.nn.dot_product_attention(x["q"], x["k"], x["v"], is_causal=True, implementation="cudnn")


def compiled_pair(forward, inputs, cotangent):
    """(jit forward, jit value_and_grad of sum(cotangent * out)) compiled for inputs."""
    loss = lambda x, ct: jnp.sum(ct.astype(jnp.float32) * forward(x).astype(jnp.float32))
    args = {name: value for name, value in inputs.items() if value is not None}
    both = jax.jit(jax.value_and_grad(loss)).lower(args, cotangent).compile()  # cotangent an argument, not a constant
    return jax.jit(forward).lower(args).compile(), lambda x: both(x, cotangent), args


def time_ms(fn, args, repeats, inner=5):
    jax.block_until_ready(fn(args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return float(np.median(times)) * 1e3


def ceilings():
    a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
    matmul = jax.jit(lambda x: x @ x)
    seconds = time_ms(matmul, a, 5) / 1e3
    x = jax.random.normal(jax.random.PRNGKey(1), (256 * 2**20,), jnp.float32)  # 1 GiB
    copy = jax.jit(lambda y: y * 1.0001)
    copy_seconds = time_ms(copy, x, 5) / 1e3
    return 2 * 8192**3 / seconds / 1e12, 2 * x.nbytes / copy_seconds / 1e9


def kernel_runs(variant, backwards_2d, impls=("pallas",)):
    """(label, impl, configuration) of each Pallas configuration to run: for impl 'pallas' one, or
    for `2d` one per backward; for 'pallas_parallel' the fused parallel-form kernel."""
    runs = []
    if "pallas" in impls and variant != "2d":
        runs.append(("pallas", "pallas", chunk_config()))  # gpu_lowering "auto": Mosaic GPU where it applies
        runs.append(("pallas triton", "pallas", chunk_config(gpu_lowering="triton")))
    if "pallas" in impls and variant == "2d":
        for backward in backwards_2d:
            name = "pallas" if backward == "refwd" else f"pallas {backward}"
            runs.append((name, "pallas", chunk_config(backward_2d=backward)))
    if "pallas_parallel" in impls:
        runs.append(("pallas parallel", "pallas_parallel", ParallelBlocks()))
    return runs


def small_checks(variants, backwards_2d, impls) -> bool:
    """The kernels against the reference: float32 (< 1e-4) and bf16 (< 2e-2), forward and grads."""
    ok = True
    print("| variant | kernel | grid | d | dtype | forward | worst gradient | ok |")
    print("|---|---|---|---|---|---|---|---|")
    for grid, d in (((12, 20), 64),):
        for dtype, tolerance in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)):
            for variant in variants:
                inputs = random_inputs(2, grid, 3, d, 3, dtype, seed=7)
                cotangent = jax.random.normal(jax.random.PRNGKey(3), inputs["v"].shape, jnp.float32)
                fwd, both, args = compiled_pair(op(grid, variant, "reference"), inputs, cotangent)
                expected = (fwd(args), both(args)[1])
                for label, impl, block in kernel_runs(variant, backwards_2d, impls):
                    fwd, both, args = compiled_pair(op(grid, variant, impl, block), inputs, cotangent)
                    actual = (fwd(args), both(args)[1])
                    out_error = rel_error(actual[0], expected[0])
                    grad_error = max(
                        rel_error(actual[1][name], expected[1][name])
                        for name in expected[1]
                        if np.any(np.asarray(expected[1][name]) != 0)
                    )
                    good = out_error < tolerance and grad_error < tolerance
                    ok &= good
                    print(f"| {variant} | {label} | {grid[0]}x{grid[1]} | {d} | {jnp.dtype(dtype).name} | "
                          f"{out_error:.1e} | {grad_error:.1e} | {'yes' if good else 'NO'} |", flush=True)
    return ok


def runs_mosaic_gpu(inputs, grid, variant, block) -> bool:
    """Whether `impl="pallas"` with this configuration runs the Mosaic GPU kernels on this machine."""
    return isinstance(block, ChunkConfig) and chunk.uses_mosaic_gpu(
        "gpu", block.tiles, block.options, inputs["q"], inputs["v"], grid=grid, variant=variant, interpret=False,
        poison=False)


def written_check(inputs, grid, variant, block, out):
    """(every output element written, how far a second output is from the expected one, how): for
    Triton kernels the output buffer is poisoned with NaN first; the Mosaic GPU kernels cannot
    alias their outputs, so they run again with v doubled: the output is linear in v and doubling
    is exact in floating point, so it must be exactly 2 * out, which a tile left holding an
    earlier result (the same buffer, or another call's) would break."""
    if runs_mosaic_gpu(inputs, grid, variant, block):
        doubled = jax.jit(op(grid, variant, "pallas", block))({**inputs, "v": inputs["v"] * 2})
        error = rel_error(doubled, 2 * out.astype(jnp.float32))
        return bool(jnp.all(jnp.isfinite(doubled.astype(jnp.float32)))) and error == 0.0, error, "v doubled"
    poisoned = poisoned_forward(inputs, grid, variant, block)
    written = bool(jnp.all(jnp.isfinite(poisoned.astype(jnp.float32))))
    return written, rel_error(poisoned, out), "poisoned"


def poisoned_forward(inputs, grid, variant, block):
    if isinstance(block, ParallelBlocks):
        decays = jnp.stack([inputs["log_decay_row"], inputs["log_decay_col"]], axis=1)
        return parallel_form.forward(inputs["q"], inputs["k"], inputs["v"], decays, grid=grid, variant=variant,
                                       blocks=block, interpret=False, poison=True)
    return chunk.run_kernel(
        inputs["q"], inputs["k"], inputs["v"], inputs["log_decay_row"], inputs["log_decay_col"], grid=grid,
        variant=variant, backend="gpu", interpret=False, tiles=block.tiles, options=block.options, tangent=None,
        out_dtype=inputs["q"].dtype, poison=True,
    )


def table(args) -> bool:
    ok = True
    heads, d = args.heads, args.dim
    print("| N | grid | batch | impl | variant | fwd ms | fwd+bwd ms | fwd x flash | fwd+bwd x flash | "
          "flash / fwd | chunked / pallas fwd | chunked / pallas fwd+bwd | fwd GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for side in args.sizes:
        grid, n = (side, side), side * side
        batch = max(1, args.tokens // n)
        inputs = random_inputs(batch, grid, heads, d, 0, jnp.bfloat16, seed=side)
        cotangent = jax.random.normal(jax.random.PRNGKey(side + 1), inputs["v"].shape, jnp.float32).astype(jnp.bfloat16)
        flash_inputs = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"]}
        fwd, both, fargs = compiled_pair(flash, flash_inputs, cotangent)
        flash_ms = (time_ms(fwd, fargs, args.repeats), time_ms(both, fargs, args.repeats))
        print(f"| {n} | {side}x{side} | {batch} | cudnn flash | - | {flash_ms[0]:.3f} | {flash_ms[1]:.3f} | 1 | 1 | 1 "
              f"| - | - | - |", flush=True)
        traffic = sum(inputs[name].nbytes for name in ("q", "k", "v")) + inputs["v"].nbytes
        for variant in args.variants:
            results, times = {}, {}
            runs = [("chunked", "chunked", None), *kernel_runs(variant, args.backward_2d, args.impls)]
            for label, impl, block in runs:
                try:
                    fwd, both, fargs = compiled_pair(op(grid, variant, impl, block), inputs, cotangent)
                    results[label] = (fwd(fargs), both(fargs)[1])
                    times[label] = (time_ms(fwd, fargs, args.repeats), time_ms(both, fargs, args.repeats))
                except Exception as error:  # report and go on with the other kernels
                    ok = False
                    print(f"| {n} | {side}x{side} | {batch} | {label} | {variant} | FAILED: "
                          f"{type(error).__name__}: {str(error)[:300]} |", flush=True)
            for label, _, block in runs[1:]:
                if label not in results or "chunked" not in results:
                    continue
                grad_errors = {
                    name: rel_error(results[label][1][name], results["chunked"][1][name])
                    for name in results["chunked"][1] if np.any(np.asarray(results["chunked"][1][name]) != 0)
                }
                errors = [rel_error(results[label][0], results["chunked"][0]), *grad_errors.values()]
                written, same, how = written_check(inputs, grid, variant, block, results[label][0])
                good = max(errors) < 2e-2 and written and same < 1e-6
                ok &= good
                print(f"  check N={n} {variant} {label}: vs chunked fwd {errors[0]:.1e}, grads "
                      f"{', '.join(f'{name} {error:.1e}' for name, error in grad_errors.items())}; "
                      f"all written ({how}): {written}, off by {same:.1e} -> "
                      f"{'ok' if good else 'FAILED'}", flush=True)
            for impl, (fwd_ms, both_ms) in times.items():
                speedup = ("-", "-")
                if impl != "chunked" and "chunked" in times:
                    speedup = (f"{times['chunked'][0] / fwd_ms:.1f}", f"{times['chunked'][1] / both_ms:.1f}")
                print(f"| {n} | {side}x{side} | {batch} | {impl} | {variant} | {fwd_ms:.3f} | {both_ms:.3f} | "
                      f"{fwd_ms / flash_ms[0]:.2f} | {both_ms / flash_ms[1]:.2f} | {flash_ms[0] / fwd_ms:.2f} | "
                      f"{speedup[0]} | {speedup[1]} | {traffic / fwd_ms / 1e6:.0f} |", flush=True)
    return ok


EXTRAS = [  # (variant, label, impl, configuration): other tilings after the table, `--extras`
    ("1d", "refwd backward (re-run forward + tangent calls)", "pallas", chunk_config(backward_generic="refwd")),
    ("1d", "1 pipeline stage", "pallas", chunk_config(num_stages=1)),
    ("1d", "value tiles of 32", "pallas", chunk_config(dv_block=32)),
    ("1d", "two passes at every N", "pallas", chunk_config(parallel_chunks=1)),
    ("1d", "T=128 chunks", "pallas", chunk_config(block_tokens=128)),
    ("2d", "R=1 row per chunk", "pallas", chunk_config(block_tokens_2d=16)),
    ("2d", "R = 128 / wp rows per chunk", "pallas", chunk_config(block_tokens_2d=128)),
    ("2d", "8 warps", "pallas", chunk_config(num_warps_2d=8)),
    ("2d", "parallel, 32-token tiles", "pallas_parallel", ParallelBlocks(block=32)),
    ("2d", "parallel, 128-token tiles, 8 warps", "pallas_parallel", ParallelBlocks(block=128, num_warps=8)),
    ("2d", "parallel, 64-token tiles, 3 stages", "pallas_parallel", ParallelBlocks(num_stages=3)),
    ("2d", "parallel, 64-token tiles, 8 warps", "pallas_parallel", ParallelBlocks(num_warps=8)),
    ("2d", "parallel, 64-token tiles, 1 stage", "pallas_parallel", ParallelBlocks(num_stages=1)),
    ("2d", "parallel, 32-token tiles, 2 warps", "pallas_parallel", ParallelBlocks(block=32, num_warps=2)),
    ("2d", "parallel, 128-token tiles, 4 warps", "pallas_parallel", ParallelBlocks(block=128, num_warps=4)),
    ("none", "parallel, 128-token tiles, 8 warps", "pallas_parallel", ParallelBlocks(block=128, num_warps=8)),
]


def extras(args, deadline):
    """Each EXTRAS tiling of the --variants and --impls at every size: forward and forward+backward ms
    (no checks)."""
    print("| N | variant | tiling | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|")
    for side in args.sizes:
        grid, n = (side, side), side * side
        inputs = random_inputs(max(1, args.tokens // n), grid, args.heads, args.dim, 0, jnp.bfloat16, seed=1)
        cotangent = jax.random.normal(jax.random.PRNGKey(2), inputs["v"].shape, jnp.float32).astype(jnp.bfloat16)
        for variant, label, impl, block in EXTRAS:
            if variant not in args.variants or impl not in args.impls:
                continue
            if time.monotonic() > deadline:
                print("(time budget spent: remaining tilings not run)")
                return
            try:
                fwd, both, fargs = compiled_pair(op(grid, variant, impl, block), inputs, cotangent)
                result = f"{time_ms(fwd, fargs, args.repeats):.3f} | {time_ms(both, fargs, args.repeats):.3f}"
            except Exception as error:
                result = f"FAILED {type(error).__name__}: {str(error)[:200]} | -"
            print(f"| {n} | {variant} | {label} | {result} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16,32,64,128", help="grid sides (N = side^2)")
    parser.add_argument("--tokens", type=int, default=32768, help="batch = tokens // N")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--variants", default="1d,2d_row,2d")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--extras", action="store_true", help="after the table, time other tilings (fwd, fwd+bwd)")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds after which --extras stops")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--impls", default="pallas",
                        help="LASAD kernels to time next to flash and chunked, comma-separated: "
                             "pallas, pallas_parallel")
    parser.add_argument("--backward-2d", default="refwd",
                        help="the 2d kernel's backward(s), comma-separated: refwd (default), sweep")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.variants = args.variants.split(",")
    args.backward_2d = args.backward_2d.split(",")
    args.impls = args.impls.split(",")
    for impl in args.impls:
        if impl not in ("pallas", "pallas_parallel"):
            print(f"--impls: unknown kernel {impl!r} (pallas, pallas_parallel)", file=sys.stderr)
            return 2
    for backward in args.backward_2d:
        ChunkOptions(backward_2d=backward)  # raises for an unknown backward before any GPU time is spent
    if jax.default_backend() != "gpu":
        print(f"this benchmark needs a GPU; jax's default backend is {jax.default_backend()!r}", file=sys.stderr)
        return 1
    start = time.monotonic()
    device = jax.devices()[0]
    print(f"# LASAD kernels on {device.device_kind}, jax {jax.__version__}, python {platform.python_version()}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    tflops, gbps = ceilings()
    print(f"ceilings: bf16 8192^3 matmul {tflops:.0f} TFLOP/s, copy {gbps:.0f} GB/s")
    print(f"shapes: H={args.heads}, d=dv={args.dim}, bf16, batch*N = {args.tokens}; median of {args.repeats}")
    ok = True
    if not args.skip_check:
        ok &= small_checks(args.variants + ["none"], args.backward_2d, args.impls)
    ok &= table(args)
    if args.extras:
        extras(args, start + args.budget)
    print("ALL CHECKS PASSED" if ok else "SOME CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
