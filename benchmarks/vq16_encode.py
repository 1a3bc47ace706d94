"""VQ-16 encoding speed at 256x256 (the extraction's device-bound part), random weights.

    python3 benchmarks/vq16_encode.py [--batch 64] [--repeats 5]

Times the jitted `VQModel.encode` of LlamaGen's VQ-16 architecture (float32 parameters and
compute, as the tokenizer runs) on random images and reports images/s, beside a float32 matmul
(default precision) timed in the same run as the device's yardstick. No FLOP ratio: XLA's cost
analysis does not count the convolutions it hands to cuDNN, so it would be meaningless.
Extraction adds reading, decoding and cropping images on the host (benchmarks/data_pipeline.py).
"""

from __future__ import annotations

import argparse
import datetime
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lasadgen_jax.tokenizer import VQ16
from lasadgen_jax.tokenizer.model import create_vq_model


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = jax.devices()[0]
    n = 8192 if device.platform == "gpu" else 1024
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul_rate = 2 * n**3 / best_time(matmul, a, repeats=args.repeats)

    model = create_vq_model(VQ16, seed=0)
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda state, images: nnx.merge(graphdef, state).encode(images))
    images = jax.random.uniform(jax.random.PRNGKey(1), (args.batch, args.size, args.size, 3), minval=-1, maxval=1)
    compiled = encode.lower(state, images).compile()
    seconds = best_time(compiled, state, images, repeats=args.repeats)
    codes = compiled(state, images)
    print(f"VQ-16 encode on {device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}: batch {args.batch} x {args.size}x{args.size}x3 float32 -> codes "
          f"{tuple(codes.shape)}")
    print(f"| images/s | ms/batch | float32 {n}^3 matmul TFLOP/s (same run) |")
    print("|---|---|---|")
    print(f"| {args.batch / seconds:,.0f} | {seconds * 1e3:.1f} | {matmul_rate / 1e12:.1f} |")


if __name__ == "__main__":
    main()
