"""Training-step time, memory, tokens/s and MFU of LASADGen: LASAD variants beside softmax, and the
training-step levers (remat, chunked loss, scanned layers) beside each other.

    python3 benchmarks/train_step.py --sizes L --grids 16,32 --attentions softmax,2d_row,2d
    python3 benchmarks/train_step.py --sizes L,XL --grids 16,32,64 --batches 256,64,16 --attentions 2d \\
        --remat none,dots --loss_chunk_tokens 0,64 --scan_layers false,true
    python3 benchmarks/train_step.py --config configs/demo.py --lasad_impl chunked   # a config as it is

The step is the trainer's own (lasadgen_jax.train_state: bf16 compute, float32 master params, AdamW,
EMA, NaN guard), compiled ahead of time once (its compile seconds and XLA's memory analysis are those
of the executable that runs), on synthetic tokens, over all local devices as a data-parallel mesh.
Every combination of size x grid x attention x remat x loss_chunk_tokens x scan_layers is one
measurement. Each grid gets one global batch (--batches, else --tokens_per_step / tokens per image),
halved on out-of-memory. Each measurement runs in a fresh process (so that the device's
peak_bytes_in_use is that measurement's; --in_process runs all in this one, peaks then cumulative).
MFU = model FLOPs (lasadgen_jax.flops.train_flops_per_token) per second over the device's peak; a
measured bf16 matmul ceiling is printed beside it. One JSON line per measurement, then a markdown
table. With --config, that config file's model, grid and batch are measured (only --lasad_impl,
--gated_norm_impl, the levers and --batches, one value, apply).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import time

RESULT = "RESULT "   # the prefix of a measuring process's one output line


def matmul_ceiling(n: int = 8192, repeats: int = 10) -> float:
    """Achieved bf16 TFLOP/s of one n^3 matmul (the roof the step's matmuls can reach)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def cudnn_accepts(tokens: int, heads: int = 16, head_dim: int = 64) -> str:
    """Whether cuDNN flash attention takes the model's causal attention shape (else XLA's is used)."""
    import jax
    import jax.numpy as jnp

    q = jnp.zeros((2, tokens, heads, head_dim), jnp.bfloat16)
    try:
        flash = lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn")
        jax.jit(flash)(q).block_until_ready()
        return "yes"
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        return f"no ({type(error).__name__}: {str(error)[:120]})"


def header(args) -> dict:
    import jax

    device = jax.devices()[0]
    ceiling = matmul_ceiling() if device.platform != "cpu" else float("nan")
    result = {"date": datetime.date.today().isoformat(), "device": device.device_kind, "devices": jax.device_count(),
              "jax": jax.__version__, "lasad_impl": args.lasad_impl,
              "gated_norm_impl": args.gated_norm_impl, "matmul_tflops_measured": ceiling,
              "peak_tflops": args.peak_tflops}
    if args.config:
        result["config"] = args.config
    elif device.platform == "gpu":
        result["cudnn_flash_for_grids"] = {g: cudnn_accepts(int(g) ** 2) for g in args.grids.split(",")}
    from lasadgen_jax.models.softmax_attention import resolve_softmax_impl

    result["softmax_impl"] = resolve_softmax_impl("auto", jax.numpy.bfloat16, 64)   # what the model's softmax runs
    return result


# ----------------------------------------------------------------------------- one measurement


def build(args, spec: dict):
    """(model config, TrainingSetup, config): imagenet256.py at spec's size, attention, grid and batch,
    or --config as it is; spec's levers set on config.model either way."""
    from lasadgen_jax import sharding
    from lasadgen_jax.config_files import load_config
    from lasadgen_jax.model_io import model_config_from
    from lasadgen_jax.train_state import setup_training

    if args.config:
        config = load_config(args.config)
    else:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "imagenet256.py")
        config = load_config(f"{path}:size={spec['size']},attention={spec['attention']}")
        config.model.grid = (spec["grid"], spec["grid"])
    if spec["batch"] is not None:
        config.batch_size = spec["batch"]
    config.model.update(remat=spec["remat"], loss_chunk_tokens=spec["loss_chunk_tokens"],
                        scan_layers=spec["scan_layers"], lasad_impl=args.lasad_impl,
                        gated_norm_impl=args.gated_norm_impl)
    if args.dropout is not None:   # class dropout (what guidance learns from) stays as configured
        config.model.update(token_dropout=args.dropout, resid_dropout=args.dropout, ffn_dropout=args.dropout)
    config.num_steps = 1000
    model_config = model_config_from(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    return model_config, setup_training(config, model_config, mesh, config.num_steps), config


def measure(args, spec: dict) -> dict:
    import jax
    import numpy as np

    from lasadgen_jax.flops import train_flops_per_token

    model_config, setup, config = build(args, spec)
    batch, num_tokens = config.batch_size, model_config.num_tokens
    setup.compile_step(batch, num_tokens)
    memory = setup.train_step.memory_analysis() or {}
    step, state = setup.train_step, setup.initial_state(model_config, config.seed)
    rng = np.random.default_rng(0)
    tokens = jax.device_put(rng.integers(0, model_config.vocab_size, (batch, num_tokens), np.int32),
                            setup.batch_sharding)
    labels = jax.device_put(rng.integers(0, model_config.num_classes, (batch,), np.int32), setup.batch_sharding)
    for _ in range(args.warmup):
        state, metrics = step(state, tokens, labels)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, tokens, labels)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / args.steps
    profile = None
    if args.profile:
        from device_profile import format_summary, profile_device_ops

        def traced_steps():
            nonlocal state, metrics
            for _ in range(args.profile_steps):
                state, metrics = step(state, tokens, labels)
            jax.block_until_ready(metrics)

        label = f"{spec.get('size')}_{model_config.attention}_{model_config.grid[0]}_b{batch}_{model_config.remat}"
        log_dir = os.path.join(args.profile, label)
        every_op = profile_device_ops(traced_steps, log_dir, per=args.profile_steps, top=None)
        with open(os.path.join(log_dir, "device_ops.json"), "w") as f:   # for device_profile.py --ops
            json.dump(every_op, f)
        profile = dict(every_op, top=every_op.get("top", [])[:25])
        print(format_summary(profile, f"{label}, per step"), file=sys.stderr, flush=True)
    if not bool(metrics["finite"]):
        raise FloatingPointError(f"{model_config.attention} {model_config.grid}: non-finite loss "
                                 f"{float(metrics['loss'])}")
    stats = jax.devices()[0].memory_stats() or {}
    tokens_per_step = batch * num_tokens
    flops = train_flops_per_token(model_config) * tokens_per_step
    peak = args.peak_tflops * 1e12 * jax.device_count()
    grid = "x".join(map(str, model_config.grid))
    return {"size": spec.get("size"), "attention": model_config.attention, "grid": grid,
            "remat": model_config.remat, "loss_chunk_tokens": model_config.loss_chunk_tokens,
            "scan_layers": model_config.scan_layers, "batch": batch, "dropout": model_config.resid_dropout,
            "compile_s": setup.train_step.compile_seconds,
            "xla_argument_bytes": memory.get("argument"), "xla_output_bytes": memory.get("output"),
            "xla_temp_bytes": memory.get("temp"), "xla_peak_estimate_bytes": memory.get("peak_estimate"),
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "peak_scope": "process (cumulative)" if args.in_process else "measurement",
            "step_ms": 1e3 * seconds, "tokens_per_s": tokens_per_step / seconds, "mfu": flops / seconds / peak,
            "model_tflops_per_s": flops / seconds / 1e12 / jax.device_count(), "loss": float(metrics["loss"]),
            "prng_impl": str(jax.config.jax_default_prng_impl), "profile": profile}


def is_out_of_memory(error: Exception | str) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def run_child(args, job: dict):
    """job ('header' or a measurement spec) in a fresh process: its result, or None on out-of-memory."""
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_child", json.dumps(job)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    results = [line[len(RESULT):] for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not results:
        raise RuntimeError(f"measuring {job} failed (exit {done.returncode}); its output:\n{done.stdout[-3000:]}")
    result = json.loads(results[-1])
    return None if result.get("out_of_memory") else result


def child_main(args) -> None:
    job = json.loads(args._child)
    if job == "header":
        result = header(args)
    else:
        try:
            result = measure(args, job)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is reported back; the rest raises
            if not is_out_of_memory(error):
                raise
            result = {"out_of_memory": True, "error": str(error)[:300]}
    print(RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the grid of measurements


def parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"--scan_layers takes true/false values, got {text!r}")
    return text.lower() in ("true", "1")


def measurement_specs(args) -> list[dict]:
    """Every measurement: size x grid (with its batch) x attention x remat x loss_chunk_tokens x scan_layers."""
    levers = list(itertools.product(args.remat.split(","), [int(c) for c in args.loss_chunk_tokens.split(",")],
                                    [parse_bool(s) for s in args.scan_layers.split(",")]))
    lever_specs = [dict(remat=r, loss_chunk_tokens=c, scan_layers=s) for r, c, s in levers]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    if args.config:
        if batches is not None and len(batches) != 1:
            raise ValueError(f"--batches with --config takes one value, got {args.batches!r}")
        return [dict(batch=batches and batches[0], **lever) for lever in lever_specs]
    grids = [int(g) for g in args.grids.split(",")]
    if batches is not None and len(batches) != len(grids):
        raise ValueError(f"--batches {args.batches} must give one batch per grid of --grids {args.grids}")
    batches = batches or [max(1, args.tokens_per_step // (grid * grid)) for grid in grids]
    return [dict(size=size, grid=grid, batch=batch, attention=attention, **lever)
            for size in args.sizes.split(",") for grid, batch in zip(grids, batches)
            for attention in args.attentions.split(",") for lever in lever_specs]


def measure_with_retries(args, spec: dict) -> dict:
    """The measurement, its batch halved while it runs out of memory (the row says which batch ran)."""
    spec = dict(spec)
    while True:
        if args.in_process:
            try:
                return measure(args, spec)
            except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
                if not is_out_of_memory(error) or spec["batch"] in (None, 1):
                    raise
        else:
            row = run_child(args, spec)
            if row is not None:
                return row
            if spec["batch"] in (None, 1):
                raise RuntimeError(f"{spec}: out of memory")
        print(f"{spec}: out of memory, halving the batch", flush=True)
        spec["batch"] //= 2


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def print_table(head: dict, rows: list[dict], args) -> None:
    print(f"\n{head['device']} x{head['devices']}, jax {head['jax']}, {head['date']}; measured bf16 matmul ceiling "
          f"{head['matmul_tflops_measured']:.0f} TFLOP/s, MFU vs {args.peak_tflops:.0f}; GiB per device; peak = "
          f"the device's peak_bytes_in_use ({rows[0]['peak_scope'] if rows else '-'})\n")
    print("| size | grid | attention | remat | loss chunk | scan | batch | compile s | XLA temp GiB | XLA args GiB "
          "| peak GiB | step ms | tokens/s | model TFLOP/s | MFU | time/token vs softmax | vs first levers |")
    print("|" + "---|" * 17)
    levers = ("remat", "loss_chunk_tokens", "scan_layers")
    first = rows[0] if rows else {}
    for row in rows:
        same = lambda r, keys: all(r[k] == row[k] for k in keys)
        softmax = next((r for r in rows if r["attention"] == "softmax" and same(r, ("size", "grid") + levers)), None)
        base = next((r for r in rows
                     if same(r, ("size", "grid", "attention")) and all(r[k] == first[k] for k in levers)), None)
        ratio = lambda other: f"{other['tokens_per_s'] / row['tokens_per_s']:.2f}x" if other else "-"
        print(f"| {row['size'] or '-'} | {row['grid']} | {row['attention']} | {row['remat']} | "
              f"{row['loss_chunk_tokens']} | {row['scan_layers']} | {row['batch']} | {row['compile_s']:.1f} | "
              f"{gib(row['xla_temp_bytes'])} | {gib(row['xla_argument_bytes'])} | {gib(row['peak_bytes_in_use'])} | "
              f"{row['step_ms']:.1f} | {row['tokens_per_s']:,.0f} | {row['model_tflops_per_s']:.0f} | "
              f"{100 * row['mfu']:.1f}% | {ratio(softmax)} | {ratio(base)} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a config file measured as it is (instead of --sizes/--grids)")
    parser.add_argument("--sizes", "--size", default="L", help="model sizes, e.g. L,XL")
    parser.add_argument("--grids", default="16,32")
    parser.add_argument("--batches", default=None, help="global batch per grid, e.g. 256,64 for --grids 16,32")
    parser.add_argument("--attentions", default="softmax,2d_row,2d")
    parser.add_argument("--tokens_per_step", type=int, default=65536, help="global batch x tokens per image")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none", help="remat policies, e.g. none,dots,full")
    parser.add_argument("--loss_chunk_tokens", default="0", help="chunked-loss chunk lengths (0: plain), e.g. 0,64")
    parser.add_argument("--scan_layers", default="false", help="e.g. false,true")
    parser.add_argument("--lasad_impl", default="auto")
    parser.add_argument("--gated_norm_impl", default="auto", help="the LASAD block's output norm and gate: "
                        "auto, xla or pallas (ops/gated_norm)")
    parser.add_argument("--dropout", type=float, default=None, help="token, residual and FFN dropout (default: the "
                        "config's, 0.1); e.g. 0 to see what the dropout masks cost")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="per-device dense bf16 peak (H200: 989)")
    parser.add_argument("--json_out", default=None)
    parser.add_argument("--profile", default=None, help="trace --profile_steps more steps into this directory and "
                        "print the top device operations (benchmarks/device_profile.py)")
    parser.add_argument("--profile_steps", type=int, default=2)
    parser.add_argument("--in_process", action="store_true", help="all measurements in this process")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child is not None:
        return child_main(args)

    specs = measurement_specs(args)   # bad lists fail before any device work
    head = header(args) if args.in_process else run_child(args, "header")
    head.update(remat=args.remat, loss_chunk_tokens=args.loss_chunk_tokens, scan_layers=args.scan_layers,
                sizes=None if args.config else args.sizes)
    print(json.dumps(head), flush=True)
    rows = []
    for spec in specs:
        rows.append(measure_with_retries(args, spec))
        print(json.dumps(rows[-1]), flush=True)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"header": head, "rows": rows}, f, indent=1)
    print_table(head, rows, args)


if __name__ == "__main__":
    main()
