"""Training-step time, tokens/s and MFU of LASADGen: LASAD variants side by side with softmax.

    python3 benchmarks/train_step.py --size L --grids 16,32 --attentions softmax,2d_row,2d
    python3 benchmarks/train_step.py --config configs/demo.py --lasad_impl chunked   # a config as it is

The step is the trainer's own (lasadgen_jax.train_state.make_train_step: bf16 compute, float32 master
params, AdamW, EMA, NaN guard), on synthetic tokens, over all local devices as a data-parallel mesh.
Each grid gets one global batch for every attention type (--tokens_per_step / tokens per image, halved
on out-of-memory). MFU = model FLOPs (lasadgen_jax.flops.train_flops_per_token) per second over the
device's peak; a measured bf16 matmul ceiling is printed beside it. One JSON line per measurement,
then a markdown table. With --config, that config file's model, grid and batch are measured
unchanged (only --lasad_impl and --remat apply).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_ceiling(n: int = 8192, repeats: int = 10) -> float:
    """Achieved bf16 TFLOP/s of one n^3 matmul (the roof the step's matmuls can reach)."""
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
    q = jnp.zeros((2, tokens, heads, head_dim), jnp.bfloat16)
    try:
        flash = lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn")
        jax.jit(flash)(q).block_until_ready()
        return "yes"
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        return f"no ({type(error).__name__}: {str(error)[:120]})"


def build(args, attention: str | None, grid: int | None, batch: int | None):
    """(model config, jitted step, state, tokens, labels): imagenet256.py at --size with this
    attention, grid and batch, or --config as it is (attention, grid and batch None)."""
    import os

    from lasadgen_jax import sharding
    from lasadgen_jax.config_files import load_config
    from lasadgen_jax.model_io import model_config_from
    from lasadgen_jax.train_state import setup_training

    if args.config:
        config = load_config(args.config)
        config.model.update(remat=args.remat, lasad_impl=args.lasad_impl)
    else:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "imagenet256.py")
        config = load_config(f"{path}:size={args.size},attention={attention}")
        config.model.update(grid=(grid, grid), remat=args.remat, lasad_impl=args.lasad_impl)
        config.batch_size = batch
    batch = config.batch_size
    config.num_steps = 1000
    model_config = model_config_from(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    setup = setup_training(config, model_config, mesh, config.num_steps)
    step, state = setup.train_step, setup.initial_state(model_config, config.seed)
    batch_sharding = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    token_values = rng.integers(0, model_config.vocab_size, (batch, model_config.num_tokens), np.int32)
    tokens = jax.device_put(token_values, batch_sharding)
    labels = jax.device_put(rng.integers(0, model_config.num_classes, (batch,), np.int32), batch_sharding)
    return model_config, step, state, tokens, labels


def measure(args, attention: str | None, grid: int | None, batch: int | None) -> dict:
    from lasadgen_jax.flops import train_flops_per_token

    model_config, step, state, tokens, labels = build(args, attention, grid, batch)
    attention, batch = model_config.attention, tokens.shape[0]
    compile_start = time.perf_counter()
    state, metrics = step(state, tokens, labels)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - compile_start
    for _ in range(args.warmup):
        state, metrics = step(state, tokens, labels)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, tokens, labels)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / args.steps
    if not bool(metrics["finite"]):
        raise FloatingPointError(f"{attention} {model_config.grid}: non-finite loss {float(metrics['loss'])}")
    tokens_per_step = batch * model_config.num_tokens
    flops = train_flops_per_token(model_config) * tokens_per_step
    peak = args.peak_tflops * 1e12 * jax.device_count()
    return {"attention": attention, "grid": "x".join(map(str, model_config.grid)), "batch": batch,
            "step_ms": 1e3 * seconds,
            "tokens_per_s": tokens_per_step / seconds, "mfu": flops / seconds / peak,
            "model_tflops_per_s": flops / seconds / 1e12 / jax.device_count(), "loss": float(metrics["loss"]),
            "compile_s": compile_seconds}


def is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a config file measured as it is (instead of --size/--grids)")
    parser.add_argument("--size", default="L")
    parser.add_argument("--grids", default="16,32")
    parser.add_argument("--attentions", default="softmax,2d_row,2d")
    parser.add_argument("--tokens_per_step", type=int, default=65536, help="global batch x tokens per image")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--lasad_impl", default="auto")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="per-device dense bf16 peak (H200: 989)")
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()

    device = jax.devices()[0]
    ceiling = matmul_ceiling() if device.platform != "cpu" else float("nan")
    header = {"date": datetime.date.today().isoformat(), "device": device.device_kind, "devices": jax.device_count(),
              "jax": jax.__version__, "size": args.size, "remat": args.remat, "lasad_impl": args.lasad_impl,
              "matmul_tflops_measured": ceiling, "peak_tflops": args.peak_tflops}
    if args.config:
        header["config"] = args.config
    elif device.platform == "gpu":
        header["cudnn_flash_for_grids"] = {g: cudnn_accepts(int(g) ** 2) for g in args.grids.split(",")}
    print(json.dumps(header), flush=True)
    rows = []
    if args.config:
        rows.append(measure(args, None, None, None))
        print(json.dumps(rows[-1]), flush=True)
    for grid in [] if args.config else [int(g) for g in args.grids.split(",")]:
        batch = max(1, args.tokens_per_step // (grid * grid))
        for attention in args.attentions.split(","):
            while True:
                try:
                    row = measure(args, attention, grid, batch)
                    break
                except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
                    if not is_out_of_memory(error) or batch == 1:
                        raise
                    print(f"{attention} {grid}x{grid} batch {batch}: out of memory, halving", flush=True)
                    batch //= 2
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump({"header": header, "rows": rows}, f, indent=1)
    print(f"\n{header['device']} x{header['devices']}, jax {header['jax']}, {header['date']}, size {args.size}, "
          f"remat {args.remat}; measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s, MFU vs {args.peak_tflops:.0f}\n")
    print("| grid | attention | batch | step ms | tokens/s | model TFLOP/s | MFU | time/token vs softmax |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        softmax = next((r for r in rows if r["grid"] == row["grid"] and r["attention"] == "softmax"), None)
        # time per token relative to softmax (= step-time ratio at equal batch)
        ratio = f"{softmax['tokens_per_s'] / row['tokens_per_s']:.2f}x" if softmax else "-"
        print(f"| {row['grid']} | {row['attention']} | {row['batch']} | {row['step_ms']:.1f} | "
              f"{row['tokens_per_s']:,.0f} | {row['model_tflops_per_s']:.0f} | {100 * row['mfu']:.1f}% | {ratio} |")


if __name__ == "__main__":
    main()
