"""Where a jitted step's device time goes: a jax.profiler trace summarised as its top device operations.

    summary = profile_device_ops(lambda: step(state), log_dir, per=num_steps)
    print(format_summary(summary))

`profile_device_ops` runs the function once under `jax.profiler.trace`, reads the trace that the
profiler writes (`plugins/profile/<time>/*.trace.json.gz`) and sums the device operations' durations
by name. `per` divides every time (e.g. by the number of decode steps in one traced call). `busy` is
the union of the operations' intervals over the span from the first to the last: what is not busy is
launch gaps and host waits. Only device processes (`/device:...`) count; on the CPU there are none.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

# Attention kernels by name (cuDNN's fused attention, this package's Pallas kernels), then the other
# matrix-multiply kernels (cuBLAS, CUTLASS, XLA's Triton gemm fusions).
ATTENTION_NAME = re.compile(r"sdpa|flash|fmha|dot_do_o|lasad_|attention", re.IGNORECASE)
GEMM_NAME = re.compile(r"gemm|cublas|cutlass|xmma|nvjet|dot|matmul|wgmma", re.IGNORECASE)


def profile_device_ops(run, log_dir: str, *, per: float = 1.0, top: int = 15) -> dict:
    """run() once under the profiler (it must block until its results are ready); its device summary."""
    import jax

    with jax.profiler.trace(log_dir):
        run()
    return summarise_trace(load_trace(log_dir), per=per, top=top)


def load_trace(log_dir: str) -> dict:
    """The newest trace.json.gz the profiler wrote under log_dir."""
    paths = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no plugins/profile/*/*.trace.json.gz under {log_dir}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        return json.load(f)


def device_events(trace: dict) -> list[dict]:
    """Complete ('X') events of the device processes; where a device has stream threads, only those
    (the other threads repeat the same work grouped by XLA op or module)."""
    events = trace.get("traceEvents", [])
    process_names = {e["pid"]: e["args"]["name"] for e in events
                     if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread_names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
                    if e.get("ph") == "M" and e.get("name") == "thread_name"}
    devices = {pid for pid, name in process_names.items() if name.startswith("/device:")}
    streams = {key for key, name in thread_names.items() if key[0] in devices and "stream" in name.lower()}
    stream_devices = {pid for pid, _ in streams}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e
            and (e["pid"] not in stream_devices or (e["pid"], e.get("tid")) in streams)]


def busy_microseconds(events: list[dict]) -> float:
    """Length of the union of the events' [ts, ts + dur) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if start >= end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarise_trace(trace: dict, *, per: float = 1.0, top: int = 15) -> dict:
    """Device time by operation name (ms per `per`), the attention and other gemm totals, and how busy
    the device was."""
    events = device_events(trace)
    if not events:
        return {"device_events": 0}
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    kernel_us = sum(total for total, _ in by_name.values())
    span_us = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    attention_us = sum(total for name, (total, _) in by_name.items() if ATTENTION_NAME.search(name))
    gemm_us = sum(total for name, (total, _) in by_name.items()
                  if GEMM_NAME.search(name) and not ATTENTION_NAME.search(name))
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])
    return {
        "device_events": len(events), "per": per,
        "span_ms": span_us / 1e3 / per, "kernel_ms": kernel_us / 1e3 / per,
        "busy_ms": busy_microseconds(events) / 1e3 / per,
        "gemm_ms": gemm_us / 1e3 / per, "attention_ms": attention_us / 1e3 / per, "launches": len(events) / per,
        "top": [{"name": name, "ms": total / 1e3 / per, "count": count / per, "share": total / kernel_us}
                for name, (total, count) in ranked[:top]],
    }


def format_summary(summary: dict, label: str = "") -> str:
    """A few lines: totals per `per`, then the top operations."""
    if not summary.get("device_events"):
        return f"profile {label}: no device operations in the trace (a CPU run has none)"
    lines = [f"profile {label}: per unit of {summary['per']:g}: span {summary['span_ms']:.3f} ms, device busy "
             f"{summary['busy_ms']:.3f} ms ({summary['busy_ms'] / summary['span_ms']:.0%}), kernel sum "
             f"{summary['kernel_ms']:.3f} ms, gemm {summary['gemm_ms']:.3f} ms, attention "
             f"{summary['attention_ms']:.3f} ms, {summary['launches']:.1f} launches",
             "| ms | share | launches | operation |", "|---|---|---|---|"]
    lines += [f"| {op['ms']:.4f} | {op['share']:.1%} | {op['count']:.1f} | {op['name'][:110]} |"
              for op in summary["top"]]
    return "\n".join(lines)
