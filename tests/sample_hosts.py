"""One process of a multi-process sampling run that tests start: `python tests/sample_hosts.py OUT_DIR`.

jax.distributed is initialised from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (as
`sample --distributed=auto` does); the process samples REQUESTS with generate_in_batches and writes what it
returns to OUT_DIR/process_<index>.npz, one array per request, and the batch sizes it sampled itself; then the
same with the model's parameters spread over both processes' devices first (keys prefixed spread_).
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# name -> (labels, batch_size, key seed): 4 batches (2, 2, 2, 1) dealt to 2 processes, and one batch that only
# process 0 samples.
REQUESTS = {"four_batches": ([4, 0, 1, 2, 3, 0, 1], 2, 5), "one_batch": ([3, 1], 4, 6)}


def spread_over_processes(model) -> None:
    """The model's parameters as arrays over every process's devices, as the trainer holds them: matrices split
    along their first axis over all devices, the rest replicated (a tiny FSDP)."""
    import jax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(jax.devices()), ("devices",))

    def spread(leaf):
        value = np.asarray(leaf)
        split = value.ndim == 2 and value.shape[0] % mesh.size == 0
        sharding = NamedSharding(mesh, PartitionSpec("devices") if split else PartitionSpec())
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    nnx.update(model, jax.tree.map(spread, nnx.state(model, nnx.Param)))


def sample_requests(spread: bool = False) -> dict:
    import jax
    from helpers import tiny_model

    from lasadgen_jax import sample

    model = tiny_model("2d", grid=(3, 5))
    if spread:
        spread_over_processes(model)
    config = sample.SamplingConfig(cfg_scale=2.0, top_k=16)
    sampled_rows, sample_batch = [], sample._sample_batch   # counts the rows this process samples itself

    def counted(graphdef, params, labels, *args):
        sampled_rows.append(len(labels))
        return sample_batch(graphdef, params, labels, *args)

    sample._sample_batch = counted
    results = {}
    for name, (labels, batch_size, seed) in REQUESTS.items():
        sampled_rows.clear()
        results[name] = sample.generate_in_batches(model, np.asarray(labels, np.int32), jax.random.PRNGKey(seed),
                                                   config, batch_size=batch_size)
        results[f"{name}_rows_sampled_here"] = np.asarray(sampled_rows, np.int32)
    sample._sample_batch = sample_batch
    return results


def main(out_dir: str) -> None:
    import jax

    from lasadgen_jax.distributed import initialize_from_environment

    initialize_from_environment("yes")
    results = sample_requests()
    results.update({f"spread_{name}": tokens for name, tokens in sample_requests(spread=True).items()})
    np.savez(os.path.join(out_dir, f"process_{jax.process_index()}.npz"), **results)
    print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
