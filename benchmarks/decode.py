"""Sampling throughput: LASAD decode state (fused decode step) vs a softmax KV cache, L-size model, batch 64.

    python benchmarks/decode.py --grids 16 --attentions softmax,2d,2d_row,1d      # on the GPU
    python benchmarks/decode.py --size B --depth 2 --grids 4 --batch 2 --decode_impl xla   # a CPU smoke run

For each attention type and token grid it times `sample.generate` (the whole token loop in one jit,
rows and columns as nested lax.scans, classifier-free guidance at --cfg_scale: the conditional and
null-class halves run as one batch of 2 x batch, temperature 1) and prints tokens/s (sampled tokens
of the `batch` images), the decode state's bytes per sequence beside the softmax KV cache's, XLA's
compiled memory, and the bandwidth floor of one step: the bytes a step must move (bf16 weights once,
plus the state or cache it reads and writes, `step_bytes`) over the copy bandwidth measured in the
same run. Weights are bf16; LASAD states are stored in --state_dtype and decoded by --decode_impl
(`auto`: the fused Pallas step on GPU). The softmax step reads its whole cache with a mask (static
shapes), which its floor counts; `softmax_attention_check` times that read against
jax.nn.dot_product_attention's implementations on the same cache.
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
from lasadgen_jax.ops.lasad import recurrent


def best_time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(gigabytes: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus written."""
    x = jnp.ones((int(gigabytes * 2**30) // 4,), jnp.float32)
    return 2 * x.nbytes / best_time(jax.jit(lambda a: a * 1.0 + 0.0), x)


def state_bytes(state) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def lasad_step_state_bytes(variant: str, w: int, d: int, dv: int, itemsize: int, num_prefix: int) -> float:
    """Bytes of state one fused step moves per (sequence, head, layer), averaged over a row: what
    kernels/decode.py reads and writes (its module docstring's table)."""
    matrix, slot = d * dv * itemsize, (d + dv) * itemsize
    prefix_slots = recurrent.prefix_slots(num_prefix, d, dv)
    prefix = prefix_slots * slot if prefix_slots else matrix  # read every step
    if variant in ("none", "1d"):
        return 2 * matrix + prefix  # read and write the state
    if variant == "2d_row":
        return 5 * matrix + prefix  # read vertical, row_sum, row; write row_sum, row (a row start: 3 + 3)
    # in a row, column c >= 1: read C[c] and the c-1 slots before c-1, write slot c-1
    in_row = sum(matrix + (c - 1) * slot + slot for c in range(1, w))
    row_start = 2 * w * matrix + (w - 1) * slot  # read every column and the slots; write every column
    return (in_row + row_start) / w + prefix


def step_bytes(model: LASADGen, batch: int) -> tuple[int, float]:
    """(weight bytes, state bytes) one decode step of `batch` sequences must move."""
    config = model.config
    params = nnx.state(model, nnx.Param)
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    weights -= model.token_embedding.embedding[...].nbytes + model.class_embedder.embedding.embedding[...].nbytes
    if config.attention == "softmax":  # the whole cache, read with a mask, plus one key and value written
        per_layer = state_bytes(model.blocks[0].attention.init_decode_state(batch, grid=config.grid))
        return weights, per_layer * config.depth
    head_dim = config.dim // config.num_heads
    itemsize = jnp.dtype(config.decode_state_dtype).itemsize
    per_head = lasad_step_state_bytes(config.attention, config.grid[1], head_dim, head_dim, itemsize,
                                      config.num_prefix)
    return weights, per_head * batch * config.num_heads * config.depth


def softmax_attention_check(model: LASADGen, batch: int):
    """One layer's decode attention over a full KV cache of this model's shape, three ways: the model's
    masked einsum (SoftmaxAttention.decode_step) and jax.nn.dot_product_attention with
    key_value_seq_lengths, implementation 'xla' and 'cudnn'. Returns {name: microseconds or error}."""
    config = model.config
    heads, head_dim = config.num_heads, config.dim // config.num_heads
    length = config.num_prefix + config.num_tokens - 1
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (batch, 1, heads, head_dim), jnp.bfloat16)
    cache_k = jax.random.normal(keys[1], (batch, length, heads, head_dim), jnp.bfloat16)
    cache_v = jax.random.normal(keys[2], (batch, length, heads, head_dim), jnp.bfloat16)
    position = length - 1

    def masked_einsum(q, k, v):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
        scores = jnp.where((jnp.arange(length) <= position)[None, None, None], scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32)

    lengths = jnp.full((batch,), position + 1, jnp.int32)
    ways = {"model (masked einsum)": masked_einsum}
    for implementation in ("xla", "cudnn"):
        ways[f"dot_product_attention {implementation}"] = lambda q, k, v, implementation=implementation: (
            jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation))
    results = {}
    for name, fn in ways.items():
        try:
            results[name] = f"{best_time(jax.jit(fn), q, cache_k, cache_v) * 1e6:.0f} us"
        except Exception as error:  # noqa: BLE001 - a benchmark reports what the device does not support
            results[name] = f"unsupported ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="L")
    parser.add_argument("--depth", type=int, default=0, help="override the size's depth (smoke runs)")
    parser.add_argument("--attentions", default="softmax,2d,2d_row,1d,none")
    parser.add_argument("--grids", default="16,32,64", help="square token grid sides")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cfg_scale", type=float, default=4.0, help="1 = no guidance")
    parser.add_argument("--decode_impl", default="auto")
    parser.add_argument("--state_dtypes", default="float32", help="LASAD state storage dtypes, comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after a first one (0: time the first)")
    parser.add_argument("--softmax_check", action="store_true", help="time the softmax decode attention ways")
    parser.add_argument("--header", action="store_true", help="print the table header")
    parser.add_argument("--profile", default=None, help="trace one more run per row into this directory and print "
                        "the top device operations per step (benchmarks/device_profile.py)")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    bandwidth = copy_bandwidth(2.0 if device.platform == "gpu" else 0.25)
    guided = args.cfg_scale != 1.0
    rows = 2 * args.batch if guided else args.batch  # sequences a step decodes
    print(f"Decode benchmark on {device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}; size {args.size}, batch {args.batch}, cfg_scale {args.cfg_scale} "
          f"({rows} sequences a step), bf16 weights, decode_impl {args.decode_impl}; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write) measured in this run", flush=True)
    if args.header:
        print("| attention | state | grid | tokens/s | ms/step | floor ms/step | x floor | weights MB/step "
              "| state MB/step | state KB/sequence | KV cache KB/sequence | compiled MB | compile s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs = [(int(side), attention, state_dtype) for side in args.grids.split(",")
            for attention in args.attentions.split(",")
            for state_dtype in (["float32"] if attention == "softmax" else args.state_dtypes.split(","))]
    for side, attention, state_dtype in runs:
        overrides = dict(attention=attention, grid=(side, side), dtype="bfloat16", param_dtype="bfloat16",
                         decode_impl=args.decode_impl, decode_state_dtype=state_dtype)
        if args.depth:
            overrides["depth"] = args.depth
        model = LASADGen(model_config(args.size, **overrides), rngs=nnx.Rngs(0))
        model.eval()
        if args.softmax_check and attention == "softmax":
            print(f"softmax decode attention, one layer, {side}x{side}, {rows} sequences:",
                  softmax_attention_check(model, rows), flush=True)
        labels = jnp.arange(args.batch, dtype=jnp.int32) % model.config.num_classes
        graphdef, params = nnx.split(model)
        config = sample.compiled_sampling_config(sample.SamplingConfig(cfg_scale=args.cfg_scale))
        scale = jnp.float32(args.cfg_scale)
        compile_start = time.perf_counter()
        compiled = sample._generate.lower(graphdef, params, labels, jax.random.PRNGKey(0), scale, config).compile()
        compile_seconds = time.perf_counter() - compile_start
        stats = compiled.memory_analysis()
        compiled_mb = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes) / 1e6
        start = time.perf_counter()
        compiled(params, labels, jax.random.PRNGKey(0), scale).block_until_ready()
        times = [time.perf_counter() - start] if args.repeats == 0 else []  # 0: the first run counts
        for repeat in range(args.repeats):
            start = time.perf_counter()
            compiled(params, labels, jax.random.PRNGKey(repeat + 1), scale).block_until_ready()
            times.append(time.perf_counter() - start)
        seconds = min(times)
        steps = side * side
        if args.profile:
            from device_profile import format_summary, profile_device_ops

            label = f"{attention}_{state_dtype}_{side}"
            run = lambda c=compiled, p=params: c(p, labels, jax.random.PRNGKey(9), scale).block_until_ready()
            profile = profile_device_ops(run, f"{args.profile}/{label}", per=steps)
            print(format_summary(profile, f"{label}, per decode step"), flush=True)
        weights, state = step_bytes(model, rows)
        floor = (weights + state) / bandwidth  # bandwidth counts every byte moved, as the step does
        per_sequence = state_bytes(model.init_decode_state(1)) / 1e3
        cache = model_config(args.size, **{**overrides, "attention": "softmax"})
        cache_kb = 2 * (cache.num_prefix + cache.num_tokens - 1) * cache.dim * 2 * cache.depth / 1e3  # bf16 k, v
        state_name = "kv bf16" if attention == "softmax" else state_dtype
        print(f"| {attention} | {state_name} | {side}x{side} | {args.batch * steps / seconds:,.0f} | "
              f"{seconds / steps * 1e3:.3f} | {floor * 1e3:.3f} | {seconds / steps / floor:.2f} | "
              f"{weights / 1e6:.0f} | {state / 1e6:.0f} | {per_sequence:,.0f} | {cache_kb:,.0f} | "
              f"{compiled_mb:.0f} | {compile_seconds:.0f} |", flush=True)
        del model, params, compiled


if __name__ == "__main__":
    main()
