"""Where a jitted step's device time goes: a jax.profiler trace summarised as its top device operations.

    summary = profile_device_ops(lambda: step(state), log_dir, per=num_steps)
    print(format_summary(summary))

`profile_device_ops` runs the function once under `jax.profiler.trace`, reads the trace that the
profiler writes (`plugins/profile/<time>/*.trace.json.gz`) and sums the device operations' durations
by name. `per` divides every time (e.g. by the number of decode steps in one traced call). `busy` is
the union of the operations' intervals over the span from the first to the last: what is not busy is
launch gaps and host waits. Only device processes (`/device:...`) count; on the CPU there are none.

What each operation is in the model's source comes from XLA's optimized HLO of the same program
(`XLA_FLAGS="--xla_dump_to=D --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*"` writes
`D/*after_optimizations.txt`): a fusion kernel carries its fusion instruction's name (`loop_add_fusion.2`
is profiled as `loop_add_fusion_2`), a Pallas kernel the name its custom call was given; cuBLAS and cuDNN
kernels are named by their library and find no HLO instruction.

    python3 benchmarks/device_profile.py --ops OPS.json --hlo HLO.txt[.gz] [--key TAG] [--top 30]
    python3 benchmarks/device_profile.py --ops OPS.json --diff TAG_A TAG_B [--hlo HLO_A --hlo_b HLO_B]

OPS.json holds one summary (as `summarise_trace` returns it) or a dict of tag -> summary.
"""

from __future__ import annotations

import argparse
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


def profile_device_ops(run, log_dir: str, *, per: float = 1.0, top: int | None = 15) -> dict:
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


def summarise_trace(trace: dict, *, per: float = 1.0, top: int | None = 15) -> dict:
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


# --- what each operation is in the source, from the optimized HLO text ---

INSTRUCTION = re.compile(r"\s+(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)")
TABLE_ENTRY = re.compile(r"(\d+) (.*)")
STACK_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
# The kernel name of a Pallas custom call: Triton's backend config holds it as `name`; Mosaic GPU's serialized
# module names its host function `<kernel>_mosaic_gpu`.
KERNEL_NAME = re.compile(r'\bname = "([\w.\-]+)"|\\?"name\\?":\s*\\?"([\w.\-]+)|\\00([A-Za-z_]\w*)_mosaic_gpu\\00')
UNCOUNTED_OPS = {"parameter", "constant"}


def quoted(text: str, key: str) -> str | None:
    """The value of key="..." in text (escaped quotes allowed), or None."""
    match = re.search(rf'\b{key}="((?:[^"\\]|\\.)*)"', text)
    return match[1] if match else None


def braced(text: str, start: int) -> str:
    """text[start:] up to its '{...}' block's closing brace (braces inside quotes do not count)."""
    depth, in_quote, i = 0, False, start
    while i < len(text):
        char = text[i]
        if in_quote:
            i += char == "\\"
            in_quote = char != '"'
        elif char == '"':
            in_quote = True
        elif char in "{}":
            depth += 1 if char == "{" else -1
            if depth == 0:
                return text[start:i + 1]
        i += 1
    return text[start:]


def split_shape(rest: str) -> tuple[str, str]:
    """'f32[8,16]{1,0} fusion(...)...' -> the shape without layouts, and what follows it; tuples too."""
    end = len(re.match(r"\S*", rest)[0])
    if rest.startswith("("):
        depth = 0
        for end, char in enumerate(rest, start=1):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
    return re.sub(r"\{[^{}]*\}", "", rest[:end]), rest[end:].lstrip()


def stack_frame_locations(tables: dict[str, dict[int, str]]) -> dict[int, str]:
    """stack_frame_id -> 'file:line' of the frame itself (the innermost user frame of the op)."""
    def field(entry: str, key: str) -> int | None:
        match = re.search(rf"\b{key}=(\d+)", entry)
        return int(match[1]) if match else None

    locations = {}
    for frame_id, frame in tables.get("StackFrames", {}).items():
        location = tables.get("FileLocations", {}).get(field(frame, "file_location_id"), "")
        file_name = tables.get("FileNames", {}).get(field(location, "file_name_id"), "").strip('"')
        if file_name:
            locations[frame_id] = f"{file_name}:{field(location, 'line')}"
    return locations


def parse_instruction(name: str, rest: str, frames: dict[int, str]) -> dict:
    """One instruction from what follows its '%name = ': shape, opcode, fusion kind or custom-call target,
    called fused computations, Pallas kernel name, op_name and source location."""
    shape, rest = split_shape(rest)
    opcode = re.match(r"[\w\-]+", rest)[0]
    attributes = re.split(r", (?:metadata|backend_config)=", rest, maxsplit=1)[0]
    metadata_at = rest.find("metadata={")
    metadata = braced(rest, metadata_at) if metadata_at >= 0 else ""
    source_file, source_line = quoted(metadata, "source_file"), re.search(r"\bsource_line=(\d+)", metadata)
    frame = re.search(r"\bstack_frame_id=(\d+)", metadata)
    location = (f"{source_file}:{source_line[1]}" if source_file and source_line
                else frames.get(int(frame[1])) if frame else None)
    backend_config = rest[rest.find("backend_config="):] if "backend_config=" in rest else ""
    kernel = KERNEL_NAME.search(backend_config)
    kind = re.search(r"\bkind=(\w+)", attributes)
    return {"name": name, "shape": shape, "opcode": opcode,
            "kind": kind[1] if kind else quoted(attributes, "custom_call_target"),
            "calls": re.findall(r"\bcalls=%?([\w.\-]+)", attributes) if opcode == "fusion" else [],
            "kernel": next(group for group in kernel.groups() if group) if kernel else None,
            "op_name": quoted(metadata, "op_name"), "location": location}


def parse_hlo_computations(text: str) -> dict[str, list[dict]]:
    """Computation name -> its instructions, from an HLO module's text (stack frame tables resolved)."""
    tables, table, computation = {}, None, None
    computations: dict[str, list[dict]] = {}
    for line in text.splitlines():
        if line in STACK_TABLES:
            table = tables.setdefault(line, {})
        elif table is not None and (entry := TABLE_ENTRY.fullmatch(line)):
            table[int(entry[1])] = entry[2]
        else:
            table = None
    frames = stack_frame_locations(tables)
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and not line.startswith("HloModule"):
            computation = computations.setdefault(line.removeprefix("ENTRY ").split()[0].lstrip("%"), [])
        elif line.startswith("}"):
            computation = None
        elif computation is not None and (instruction := INSTRUCTION.match(line)):
            computation.append(parse_instruction(instruction["name"], instruction["rest"], frames))
    return computations


def short_op_name(op_name: str, parts: int = 3) -> str:
    return "/".join(op_name.split("/")[-parts:])


def short_location(location: str | None, parts: int = 2) -> str:
    return "/".join(location.split("/")[-parts:]) if location else "?"


def parse_hlo_fusions(text: str) -> dict[str, dict]:
    """Each fusion and custom call outside fused computations (the kernels a profile names), by HLO name:
    its shape, kind (fusion kind or custom-call target), Pallas kernel name, the fused computation's op
    counts (nested fusions included; parameters and constants not), and `sources`: the distinct
    [op_name (last components), 'dir/file.py:line', count] of its instructions, most frequent first."""
    computations = parse_hlo_computations(text)
    if not computations:
        raise ValueError("no HLO computation in the text (expected an HLO module, e.g. *after_optimizations.txt)")
    fused = {called for body in computations.values() for inst in body for called in inst["calls"]}

    def fused_instructions(names: list[str]) -> list[dict]:
        body = [inst for name in names for inst in computations.get(name, [])]
        return [leaf for inst in body for leaf in (fused_instructions(inst["calls"]) if inst["calls"] else [inst])]

    fusions = {}
    for name, body in computations.items():
        if name in fused:
            continue
        for inst in body:
            if inst["opcode"] not in ("fusion", "custom-call"):
                continue
            inner = fused_instructions(inst["calls"]) or [inst]
            sources = collections.Counter((short_op_name(i["op_name"]), short_location(i["location"]))
                                          for i in inner if i["op_name"] and i["opcode"] not in UNCOUNTED_OPS)
            if not sources and inst["op_name"]:   # fused instructions without metadata: the fusion's own
                sources[short_op_name(inst["op_name"]), short_location(inst["location"])] = 1
            fusions[inst["name"]] = {
                "name": inst["name"], "shape": inst["shape"], "opcode": inst["opcode"], "kind": inst["kind"],
                "kernel": inst["kernel"], "in_computation": name,
                "op_counts": dict(collections.Counter(i["opcode"] for i in inner if i["opcode"] not in UNCOUNTED_OPS)
                                  .most_common()) if inst["calls"] else {},
                "sources": [[op, location, count] for (op, location), count in sources.most_common()],
            }
    return fusions


def normal_name(name: str) -> str:
    return re.sub(r"[.\-]", "_", name)


def find_instructions(fusions: dict[str, dict], op_name: str) -> list[dict]:
    """The HLO instructions a profiled kernel name stands for: the fusion or custom call of that name ('.'
    and '-' written '_'), else the custom calls of the Pallas kernel whose name is the longest prefix of
    it (or that it is a prefix of); [] where none (cuBLAS and cuDNN kernels are named by the library)."""
    key = normal_name(op_name)
    exact = [info for info in fusions.values() if normal_name(info["name"]) == key]
    if exact:
        return exact
    kernels = {normal_name(info["kernel"]) for info in fusions.values() if info["kernel"]}
    matching = [kernel for kernel in kernels if key.startswith(kernel) or kernel.startswith(key)]
    if not matching:
        return []
    best = max(matching, key=lambda kernel: (len(os.path.commonprefix([kernel, key])), -len(kernel)))
    return [info for info in fusions.values() if info["kernel"] and normal_name(info["kernel"]) == best]


def describe_instructions(infos: list[dict], sources: int = 3, indent: str = "      ") -> list[str]:
    """Lines for the HLO instructions of one profiled name: what it is, then its top source locations."""
    if not infos:
        return [f"{indent}(no fusion or custom call of this name in the HLO)"]
    first = infos[0]
    sites = f" (and {len(infos) - 1} more call sites)" if len(infos) > 1 else ""
    kernel = f" kernel {first['kernel']}" if first["kernel"] else ""
    counts = ", ".join(f"{op} {count}" for op, count in list(first["op_counts"].items())[:8])
    lines = [f"{indent}= {first['name']}{sites}: {first['opcode']} {first['kind']}{kernel} -> {first['shape']}"
             + (f"; {counts}" if counts else "")]
    merged = collections.Counter()
    for info in infos:
        merged.update({(op, location): count for op, location, count in info["sources"]})
    lines += [f"{indent}  {location}  {op} (x{count})" for (op, location), count in merged.most_common(sources)]
    return lines


def describe_top(summary: dict, fusions: dict[str, dict], top: int = 30) -> str:
    """The summary's top operations (ms and launches per unit of `per`), each with what it is in the HLO."""
    if not summary.get("device_events"):
        return "no device operations in the summary"
    lines = [f"top device operations per unit of {summary['per']:g} (kernel sum {summary['kernel_ms']:.3f} ms)",
             f"{'ms':>9} {'launches':>8}  operation"]
    for op in summary["top"][:top]:
        lines.append(f"{op['ms']:9.3f} {op['count']:8.1f}  {op['name'][:110]}")
        lines += describe_instructions(find_instructions(fusions, op["name"]))
    return "\n".join(lines)


def describe_diff(summary_a: dict, summary_b: dict, fusions_a: dict | None = None, fusions_b: dict | None = None,
                  top: int = 30, labels: tuple[str, str] = ("A", "B")) -> str:
    """Operations of two summaries side by side by name, largest |B - A| first. An operation outside one
    summary's top list is shown as '-' there and counts as 0 ms in B - A."""
    ms_a = {op["name"]: op["ms"] for op in summary_a.get("top", [])}
    ms_b = {op["name"]: op["ms"] for op in summary_b.get("top", [])}
    names = sorted(ms_a.keys() | ms_b.keys(),
                   key=lambda name: (-abs(ms_b.get(name, 0.0) - ms_a.get(name, 0.0)), name))
    lines = [f"{labels[0]:>9} {labels[1]:>9} {'B - A':>9}  operation (ms per unit)"]
    for name in names[:top]:
        a, b = ms_a.get(name), ms_b.get(name)
        cells = [f"{ms:9.3f}" if ms is not None else f"{'-':>9}" for ms in (a, b)]
        lines.append(f"{cells[0]} {cells[1]} {(b or 0.0) - (a or 0.0):+9.3f}  {name[:110]}")
        for label, fusions in ((labels[0], fusions_a), (labels[1], fusions_b)):
            if fusions is not None:
                lines += describe_instructions(find_instructions(fusions, name), indent=f"      {label}: ")
    return "\n".join(lines)


def read_hlo(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    return (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode()


def select_summary(ops: dict, key: str | None) -> dict:
    """One summary from OPS.json's content: the file itself, or its entry `key` in a dict of tag -> summary."""
    if "device_events" in ops:
        if key is not None:
            raise ValueError(f"summary {key!r} asked for, but the ops file holds one summary, not tag -> summary")
        return ops
    if key not in ops:
        raise ValueError(f"summary {key!r} is not in the ops file; its summaries: {sorted(ops)}")
    return ops[key]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", required=True, help="a summary, or a dict of tag -> summary (JSON)")
    parser.add_argument("--hlo", default=None, help="optimized HLO text (.txt or .txt.gz) of the (first) summary")
    parser.add_argument("--hlo_b", default=None, help="with --diff: the optimized HLO of the second summary")
    parser.add_argument("--key", default=None, help="the summary's tag, where --ops holds several")
    parser.add_argument("--diff", nargs=2, metavar=("KEY_A", "KEY_B"), default=None, help="compare two summaries")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    with open(args.ops) as f:
        ops = json.load(f)
    try:
        fusions = parse_hlo_fusions(read_hlo(args.hlo)) if args.hlo else None
        if args.diff:
            if args.key is not None:
                raise ValueError("--key and --diff: --diff names both summaries")
            fusions_b = parse_hlo_fusions(read_hlo(args.hlo_b)) if args.hlo_b else None
            summaries = [select_summary(ops, key) for key in args.diff]
            print(describe_diff(*summaries, fusions, fusions_b, top=args.top, labels=tuple(args.diff)))
        elif args.hlo_b or not args.hlo:
            raise ValueError("without --diff, give --hlo (and no --hlo_b): one summary and its HLO")
        else:
            print(describe_top(select_summary(ops, args.key), fusions, top=args.top))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
