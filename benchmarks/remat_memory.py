"""What each remat policy keeps from the training forward for the backward: bytes by name, traced, not run.

    python3 benchmarks/remat_memory.py --size L --attention 2d --grid 16 --batch 256 \\
        --remat dots,dots_attention_inputs,dots_matmul_inputs

The gradient of the trainer's loss (`lasadgen_jax.loss.next_token_loss`, dropout on) is traced with abstract
shapes (nothing is compiled or allocated, so any size runs on a CPU in seconds) and
`jax.ad_checkpoint.print_saved_residuals` lists every value it keeps. They are summed by the name a policy
keeps them under (`lasadgen_jax/models/remat_names.py`), the matmul outputs, and the rest; parameters
and other inputs of the step are left out. The named values are the same on every backend; the unnamed
residuals of the attention op depend on the algorithm that runs it (`--lasad_impl`, resolved on this
backend, and softmax's XLA attention here where a GPU runs cuDNN's), so the differences between policies
are exact and the totals are the CPU program's. A policy's cost in a real step, with XLA's own buffers
and peak, is what benchmarks/train_step.py measures.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lasadgen_jax.loss import next_token_loss
from lasadgen_jax.models.lasadgen import REMAT_POLICIES, LASADGen, model_config

DTYPES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "u32": 4, "i8": 1, "u8": 1, "bool": 1}
RESIDUAL = re.compile(r"^(\w+)\[([\d,]*)\] (.*)$")


def residual_bytes(line: str) -> tuple[int, str] | None:
    """(bytes, group) of one print_saved_residuals line; None for the step's inputs and literals."""
    match = RESIDUAL.match(line)
    if match is None:
        raise ValueError(f"unexpected print_saved_residuals line: {line!r}")
    dtype, shape, origin = match.groups()
    if origin.startswith(("from the argument", "from a literal")):
        return None
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} in print_saved_residuals line: {line!r}")
    nbytes = DTYPES[dtype] * int(np.prod([int(n) for n in shape.split(",") if n], dtype=np.int64))
    named = re.match(r"named '(\w+)'", origin)
    if named:
        return nbytes, named.group(1)
    return nbytes, "matmul outputs" if origin.startswith("output of dot_general") else "other"


def policy_bytes(size: str, attention: str, grid: int, batch: int, remat: str, loss_chunk_tokens: int,
                 lasad_impl: str) -> collections.Counter:
    """Bytes kept by group for one policy: the model of configs/imagenet256.py's settings at this size and grid."""
    config = model_config(size, attention=attention, grid=(grid, grid), vocab_size=16384, num_classes=1000,
                          dtype="bfloat16", param_dtype="float32", remat=remat, loss_chunk_tokens=loss_chunk_tokens,
                          scan_layers=False, lasad_impl=lasad_impl)
    model = nnx.eval_shape(lambda: LASADGen(config, rngs=nnx.Rngs(0, dropout=1)))
    model.train()
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((batch, config.num_tokens), jnp.int32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(
            lambda state, tokens, labels: next_token_loss(nnx.merge(graphdef, state), tokens, labels),
            state, tokens, labels)
    groups = collections.Counter()
    for line in printed.getvalue().splitlines():
        kept = residual_bytes(line)
        if kept is not None:
            groups[kept[1]] += kept[0]
    return groups


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="L")
    parser.add_argument("--attention", default="2d")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256, help="per-device batch")
    parser.add_argument("--remat", default="dots,dots_attention_inputs,dots_matmul_inputs")
    parser.add_argument("--loss_chunk_tokens", type=int, default=64)
    parser.add_argument("--lasad_impl", default="auto")
    args = parser.parse_args()
    policies = args.remat.split(",")
    unknown = [p for p in policies if p not in REMAT_POLICIES]
    if unknown:
        parser.error(f"--remat: unknown policies {unknown}; known: {sorted(REMAT_POLICIES)}")
    kept = {p: policy_bytes(args.size, args.attention, args.grid, args.batch, p, args.loss_chunk_tokens,
                            args.lasad_impl) for p in policies}
    groups = sorted({g for counts in kept.values() for g in counts}, key=lambda g: -max(c[g] for c in kept.values()))
    gib = lambda n: f"{n / 2**30:.2f}"
    print(f"{args.size}, {args.attention}, {args.grid}x{args.grid}, batch {args.batch}, loss chunk "
          f"{args.loss_chunk_tokens}, jax {jax.__version__} on {jax.default_backend()}: GiB kept for the backward\n")
    print("| policy | total | vs first | " + " | ".join(groups) + " |")
    print("|---" * (3 + len(groups)) + "|")
    first = sum(kept[policies[0]].values())
    for policy in policies:
        total = sum(kept[policy].values())
        print(f"| {policy} | {gib(total)} | {(total - first) / 2**30:+.2f} | "
              + " | ".join(gib(kept[policy][g]) for g in groups) + " |")


if __name__ == "__main__":
    main()
