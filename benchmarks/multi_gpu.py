"""Multi-GPU data + FSDP training: the trainer's step over meshes of n devices vs one.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python3 benchmarks/multi_gpu.py --size L --attention 2d_row --steps 50 --json_out R.json
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python3 benchmarks/multi_gpu.py --smoke   # CPU check

With n = all local devices and meshes (data, fsdp, tensor) = (n,1,1), (1,n,1), (n/2,2,1):
1. Same loss: every mesh and one device run the same --steps steps from the same seed on the same
   global batches (synthetic tokens, --per_device_batch x n sequences): the loss curves must agree
   within --rtol (bf16 compute: the reduction order differs between meshes).
2. Scaling: tokens/s per device on each mesh (per-device batch --per_device_batch) over one device
   at the same per-device batch (a separate, timing-only run): the weak-scaling efficiency.
3. Checkpoint: the (n,1,1) run's final state, written with Orbax, restores on one device with
   bit-equal parameters, optimizer state and EMA.
Exit status 1 if a loss curve or the restore disagrees. The NCCL variables above keep NVLink
multicast off (the device machines' KINDS.md says why); the script sets them if unset.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
for _name, _value in NVLINK_MULTICAST_OFF.items():
    os.environ.setdefault(_name, _value)

import jax  # noqa: E402  (after the NCCL environment)
import numpy as np  # noqa: E402

from lasadgen_jax.config_files import load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(args, global_batch: int, mesh: tuple[int, int, int]):
    path = os.path.join(REPO, "configs", "imagenet256.py")
    config = load_config(f"{path}:size={args.size},attention={args.attention}")
    config.model.update(grid=(args.grid, args.grid), lasad_impl=args.lasad_impl, remat=args.remat)
    if args.smoke:
        config.model.update(depth=2, dim=64, num_heads=4, vocab_size=256, num_classes=10, dtype="float32")
    config.batch_size = global_batch
    config.num_steps = args.steps
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return config


def synthetic_batches(args, model_config, global_batch: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(args.seed)
    return [(rng.integers(0, model_config.vocab_size, (global_batch, model_config.num_tokens), np.int32),
             rng.integers(0, model_config.num_classes, (global_batch,), np.int32)) for _ in range(steps)]


def run_mesh(args, mesh_shape, devices, global_batch: int, steps: int, timed_from: int = 2) -> dict:
    """`steps` trainer steps on `devices` arranged as mesh_shape: losses, seconds per step, final state."""
    from lasadgen_jax import sharding, train
    from lasadgen_jax.model_io import model_config_from
    from lasadgen_jax.train_config import check_batch_fits_mesh
    from lasadgen_jax.train_state import setup_training

    config = make_config(args, global_batch, mesh_shape)
    model_config = model_config_from(config)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    check_batch_fits_mesh(config, mesh)
    setup = setup_training(config, model_config, mesh, config.num_steps)
    state = setup.initial_state(model_config, config.seed)
    losses, started = [], time.perf_counter()
    for index, (tokens, labels) in enumerate(synthetic_batches(args, model_config, global_batch, steps)):
        if index == timed_from:
            jax.block_until_ready(state)
            timer = time.perf_counter()
        state, metrics = setup.train_step(state, *train.global_batch({"tokens": tokens, "label": labels}, mesh))
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - timer) / (steps - timed_from)
    losses = [float(loss) for loss in jax.device_get(losses)]
    tokens_per_second = global_batch * model_config.num_tokens / seconds
    return {"mesh": list(mesh_shape), "devices": len(devices), "global_batch": global_batch, "losses": losses,
            "step_ms": round(1e3 * seconds, 2), "tokens_per_s": round(tokens_per_second),
            "tokens_per_s_per_device": round(tokens_per_second / len(devices)),
            "wall_s": round(time.perf_counter() - started, 1), "_state": state, "_setup": setup, "_config": config}


def restore_on_one_device(args, run: dict, device) -> float:
    """Saves run's state (n devices) with Orbax, restores it on one device: max |difference| over the tree."""
    import orbax.checkpoint as ocp

    from lasadgen_jax import sharding
    from lasadgen_jax.model_io import model_config_from
    from lasadgen_jax.train_state import setup_training

    config = make_config(args, run["global_batch"], (1, 1, 1))
    model_config = model_config_from(config)
    mesh = sharding.make_mesh(config.mesh.to_dict(), [device])
    setup = setup_training(config, model_config, mesh, config.num_steps)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), setup.abstract_state,
                          setup.state_shardings)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "state")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, run["_state"])
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(path, target)
    assert all(leaf.sharding.device_set == {device} for leaf in jax.tree.leaves(restored))
    largest_difference = lambda a, b: float(
        np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
    differences = jax.tree.map(largest_difference, jax.device_get(run["_state"]), jax.device_get(restored))
    return max(jax.tree.leaves(differences))


def meshes_for(n: int) -> list[tuple[int, int, int]]:
    meshes = [(n, 1, 1), (1, n, 1)]
    if n >= 4 and n % 2 == 0:
        meshes.append((n // 2, 2, 1))
    return meshes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="L")
    parser.add_argument("--attention", default="2d_row")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--lasad_impl", default="auto")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--per_device_batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=2e-2, help="loss agreement (bf16 compute)")
    parser.add_argument("--smoke", action="store_true", help="a tiny float32 model (CPU check; rtol 1e-5)")
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.rtol, args.steps, args.per_device_batch = min(args.rtol, 1e-5), min(args.steps, 6), 2

    devices = jax.devices()
    n = len(devices)
    if n < 2:
        sys.exit(f"multi_gpu.py needs several devices, found {n} ({devices[0].device_kind})")
    header = {"date": datetime.date.today().isoformat(), "device": devices[0].device_kind, "devices": n,
              "jax": jax.__version__, "size": args.size, "attention": args.attention, "grid": args.grid,
              "per_device_batch": args.per_device_batch, "steps": args.steps,
              "nccl": {name: os.environ.get(name) for name in NVLINK_MULTICAST_OFF}}
    print(json.dumps(header), flush=True)
    global_batch = args.per_device_batch * n

    single = run_mesh(args, (1, 1, 1), devices[:1], global_batch, args.steps)
    single_timing = run_mesh(args, (1, 1, 1), devices[:1], args.per_device_batch, min(args.steps, 12))
    baseline = single_timing["tokens_per_s_per_device"]
    print(f"1 device: batch {global_batch} losses {single['losses'][0]:.4f} -> {single['losses'][-1]:.4f}; "
          f"batch {args.per_device_batch}: {baseline:,} tokens/s", flush=True)
    rows, failed = [], False
    for mesh_shape in meshes_for(n):
        run = run_mesh(args, mesh_shape, devices, global_batch, args.steps)
        worst = float(np.max(np.abs(np.asarray(run["losses"]) - single["losses"]) / np.abs(single["losses"])))
        row = {key: value for key, value in run.items() if not key.startswith("_")}
        row.update(max_loss_rel_diff=worst, losses_agree=worst <= args.rtol,
                   scaling_efficiency=round(run["tokens_per_s_per_device"] / baseline, 3))
        if mesh_shape == (n, 1, 1):
            row["restore_on_one_device_max_abs_diff"] = restore_on_one_device(args, run, devices[0])
            failed |= row["restore_on_one_device_max_abs_diff"] != 0.0
        failed |= not row["losses_agree"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        del run

    print("\n| mesh (data, fsdp, tensor) | global batch | step ms | tokens/s per device | scaling efficiency | "
          "max loss rel. diff vs 1 device |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 device | {args.per_device_batch} | {single_timing['step_ms']} | {baseline:,} | 1 | - |")
    for row in rows:
        print(f"| {tuple(row['mesh'])} | {row['global_batch']} | {row['step_ms']} | {row['tokens_per_s_per_device']:,} "
              f"| {row['scaling_efficiency']} | {row['max_loss_rel_diff']:.2e} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"header": header, "single_device_losses": single["losses"],
                       "single_device_timing": {k: v for k, v in single_timing.items() if not k.startswith("_")},
                       "meshes": rows}, f, indent=1)
    if failed:
        print("FAILED: a loss curve or the one-device restore disagrees", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
