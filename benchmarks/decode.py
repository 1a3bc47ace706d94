"""Sampling throughput: LASAD decode state vs a softmax KV cache, L-size model, batch 64.

    python benchmarks/decode.py                              # on the GPU
    python benchmarks/decode.py --size B --depth 2 --grids 4,8 --batch 2     # a CPU smoke run

For each attention type and token grid it times `sample.generate` (the whole token loop in one
jit, rows and columns as nested lax.scans, no guidance, temperature 1) and prints tokens/s, XLA's compiled memory (arguments +
outputs + temporaries), the decode state's size, and the bandwidth floor of one step: the bytes a
step must move (bf16 weights once, plus the state or cache it reads and writes) over the copy
bandwidth measured in the same run. Weights are bf16 (param_dtype) for decoding; LASAD states are
float32. The softmax step reads its whole cache with a mask (static shapes), which the floor counts.
"""

from __future__ import annotations

import argparse
import datetime
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lasadgen_jax import sample
from lasadgen_jax.models.lasadgen import LASADGen, model_config


def copy_bandwidth(gigabytes: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus written."""
    x = jnp.ones((int(gigabytes * 2**30) // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0 + 0.0)
    copy(x).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / min(times)


def state_bytes(state) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def step_bytes(model: LASADGen, batch: int) -> tuple[int, int]:
    """(weight bytes, state bytes) one decode step must move."""
    config = model.config
    params = nnx.state(model, nnx.Param)
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    weights -= model.token_embedding.embedding[...].nbytes + model.class_embedder.embedding.embedding[...].nbytes
    matrix = batch * config.num_heads * (config.dim // config.num_heads) ** 2 * 4  # one float32 d x dv per (b, h)
    per_layer = {
        "softmax": None,
        "2d_row": 6 * matrix,  # read vertical, row_sum, row, prefix; write row_sum, row
        "2d": 9 * matrix,  # read column, row, prefix; write row_kv[c], row; the row fold (4w matrices) once per w steps
        "1d": 3 * matrix,
        "none": 3 * matrix,
    }[config.attention]
    if per_layer is None:  # the whole cache, read with a mask, plus one key and value written
        per_layer = state_bytes(model.blocks[0].attention.init_decode_state(batch, grid=config.grid))
    return weights, per_layer * config.depth


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="L")
    parser.add_argument("--depth", type=int, default=0, help="override the size's depth (smoke runs)")
    parser.add_argument("--attentions", default="2d,2d_row,softmax")
    parser.add_argument("--grids", default="16,32,64", help="square token grid sides")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    bandwidth = copy_bandwidth(2.0 if device.platform == "gpu" else 0.25)
    print(f"Decode benchmark on {device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}; size {args.size}, batch {args.batch}, bf16 weights; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write) measured in this run")
    print("| attention | grid | tokens/s | ms/step | floor ms/step | x floor | weights MB/step | state MB/step "
          "| decode state MB | compiled MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for attention in args.attentions.split(","):
        for side in (int(s) for s in args.grids.split(",")):
            overrides = dict(attention=attention, grid=(side, side), dtype="bfloat16", param_dtype="bfloat16")
            if args.depth:
                overrides["depth"] = args.depth
            model = LASADGen(model_config(args.size, **overrides), rngs=nnx.Rngs(0))
            model.eval()
            labels = jnp.arange(args.batch, dtype=jnp.int32) % model.config.num_classes
            graphdef, params = nnx.split(model)
            config = sample.compiled_sampling_config(sample.SamplingConfig())
            scale = jnp.float32(1.0)
            compiled = sample._generate.lower(graphdef, params, labels, jax.random.PRNGKey(0), scale, config).compile()
            stats = compiled.memory_analysis()
            compiled_mb = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes) / 1e6
            compiled(params, labels, jax.random.PRNGKey(0), scale).block_until_ready()
            times = []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                compiled(params, labels, jax.random.PRNGKey(repeat + 1), scale).block_until_ready()
                times.append(time.perf_counter() - start)
            seconds = min(times)
            steps = side * side
            weights, state = step_bytes(model, args.batch)
            floor = (weights + state) / bandwidth  # bandwidth counts every byte moved, as the step does
            decode_state = state_bytes(model.init_decode_state(args.batch)) / 1e6
            print(f"| {attention} | {side}x{side} | {args.batch * steps / seconds:,.0f} | {seconds / steps * 1e3:.3f} | "
                  f"{floor * 1e3:.3f} | {seconds / steps / floor:.1f} | {weights / 1e6:.0f} | {state / 1e6:.0f} | "
                  f"{decode_state:.0f} | {compiled_mb:.0f} |", flush=True)
            del model, params, compiled


if __name__ == "__main__":
    main()
