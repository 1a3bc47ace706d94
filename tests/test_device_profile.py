"""benchmarks/device_profile.py: the trace summary counts device stream operations only, once each; the
optimized HLO says what each profiled kernel is (shape, ops, source lines)."""

import gzip
import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import device_profile  # noqa: E402


def _trace():
    def meta(pid, name, tid=None):
        if tid is None:
            return {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
        return {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}

    op = lambda pid, tid, name, ts, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}
    return {"traceEvents": [
        meta(1, "/host:CPU"), meta(2, "/device:GPU:0"),
        meta(2, "Stream #13(Compute)", tid=13), meta(2, "XLA Ops", tid=99),
        op(1, 5, "PjitFunction(step)", 0, 100),                 # host: not counted
        op(2, 13, "gemm_fusion_dot_1", 0, 10), op(2, 13, "loop_add_fusion", 10, 5),
        op(2, 13, "gemm_fusion_dot_1", 30, 10), op(2, 13, "loop_add_fusion", 35, 10),   # overlaps the gemm by 5
        op(2, 13, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 45, 4), op(2, 13, "lasad_decode_2d", 49, 1),
        op(2, 99, "dot.1", 0, 10),                              # the same work on the grouped line: not counted
    ]}


def test_summary_counts_stream_operations_once():
    summary = device_profile.summarise_trace(_trace(), per=2.0, top=5)
    assert summary["device_events"] == 6
    assert summary["span_ms"] == pytest.approx(50 / 1e3 / 2)
    assert summary["kernel_ms"] == pytest.approx(40 / 1e3 / 2)
    assert summary["busy_ms"] == pytest.approx(35 / 1e3 / 2)      # [0, 15) and [30, 50)
    assert summary["gemm_ms"] == pytest.approx(20 / 1e3 / 2)      # cuDNN's attention is attention, not gemm
    assert summary["attention_ms"] == pytest.approx(5 / 1e3 / 2)
    assert [op["name"] for op in summary["top"][:2]] == ["gemm_fusion_dot_1", "loop_add_fusion"]
    assert summary["top"][0]["count"] == 1.0 and summary["top"][1]["share"] == pytest.approx(15 / 40)
    assert "gemm_fusion_dot_1" in device_profile.format_summary(summary, "step")


def test_host_only_trace_has_no_device_operations():
    trace = {"traceEvents": [e for e in _trace()["traceEvents"] if e["pid"] == 1]}
    summary = device_profile.summarise_trace(trace)
    assert summary == {"device_events": 0}
    assert "no device operations" in device_profile.format_summary(summary)


def test_missing_trace_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="trace.json.gz"):
        device_profile.load_trace(str(tmp_path))


def _scaled_and_reduced(x, w):
    import jax.numpy as jnp

    scaled = x * 3.0 + 1.0
    shifted = jnp.tanh(w) * 2.0 + 5.0
    return scaled, jnp.tanh(scaled).sum(axis=1), shifted


SCALE_LINE = _scaled_and_reduced.__code__.co_firstlineno + 3
REDUCE_LINE = SCALE_LINE + 2


@pytest.fixture(scope="module")
def cpu_hlo():
    """XLA's optimized HLO text of _scaled_and_reduced on the CPU (CPU-style fusion names)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(_scaled_and_reduced).lower(jnp.ones((8, 16)), jnp.ones((5, 7))).compile().as_text()


def _one(fusions, shape):
    found = [info for info in fusions.values() if info["shape"] == shape]
    assert len(found) == 1, (shape, sorted(fusions))
    return found[0]


def test_optimized_hlo_fusions_have_their_ops_and_source_lines(cpu_hlo):
    fusions = device_profile.parse_hlo_fusions(cpu_hlo)
    here = f"tests/test_device_profile.py:{SCALE_LINE}"
    scaled = _one(fusions, "f32[8,16]")
    assert (scaled["opcode"], scaled["kind"]) == ("fusion", "kLoop")
    assert scaled["op_counts"]["multiply"] == 1 and scaled["op_counts"]["add"] == 1
    assert not {"parameter", "constant"} & scaled["op_counts"].keys()
    assert {(op.split("/")[-1], location) for op, location, _ in scaled["sources"]} == {("mul", here), ("add", here)}
    reduced = _one(fusions, "f32[8]")
    # the reducer's add is a to_apply region, not part of the fused computation's own ops
    assert (reduced["op_counts"]["reduce"], reduced["op_counts"]["add"], reduced["op_counts"]["tanh"]) == (1, 1, 1)
    locations = {(op.split("/")[-1], location) for op, location, _ in reduced["sources"]}
    assert {("mul", here), ("reduce_sum", f"tests/test_device_profile.py:{REDUCE_LINE}")} <= locations
    assert _one(fusions, "f32[5,7]")["sources"][0][1] == f"tests/test_device_profile.py:{SCALE_LINE + 1}"


def test_describe_top_matches_profiled_names_to_hlo_names(cpu_hlo):
    fusions = device_profile.parse_hlo_fusions(cpu_hlo)
    names = {shape: _one(fusions, shape)["name"] for shape in ("f32[8,16]", "f32[5,7]")}
    profiled = {shape: name.replace(".", "_") for shape, name in names.items()}   # a GPU profile's spelling
    summary = {"device_events": 3, "per": 1.0, "kernel_ms": 3.0, "top": [
        {"name": profiled["f32[5,7]"], "ms": 2.0, "count": 1.0, "share": 2 / 3},
        {"name": profiled["f32[8,16]"], "ms": 0.5, "count": 1.0, "share": 1 / 6},
        {"name": "nvjet_tst_128x64_64x4", "ms": 0.5, "count": 2.0, "share": 1 / 6}]}
    text = device_profile.describe_top(summary, fusions, top=3)
    blocks = text.split("\n")[2:]
    heads = [i for i, line in enumerate(blocks) if not line.startswith(" " * 6)]
    by_name = {blocks[i].split()[-1]: "\n".join(blocks[i + 1:j]) for i, j in zip(heads, heads[1:] + [len(blocks)])}
    assert f"= {names['f32[8,16]']}: fusion kLoop -> f32[8,16]" in by_name[profiled["f32[8,16]"]]
    assert f"test_device_profile.py:{SCALE_LINE}" in by_name[profiled["f32[8,16]"]]
    assert f"= {names['f32[5,7]']}: fusion kLoop -> f32[5,7]" in by_name[profiled["f32[5,7]"]]
    assert f"test_device_profile.py:{SCALE_LINE + 1}" in by_name[profiled["f32[5,7]"]]
    assert "no fusion or custom call" in by_name["nvjet_tst_128x64_64x4"]
    assert device_profile.describe_top(summary, fusions, top=1).count("\n") < text.count("\n")


def _metadata(op_name, source_file, line):
    return (f'metadata={{op_name="jit(train_step)/{op_name}" source_file="/src/lasadgen_jax/{source_file}" '
            f'source_line={line}}}')


MUL = _metadata("jvp(LASADGen)/blocks/mlp/mul", "models/blocks.py", 88)
ADD = _metadata("jvp(LASADGen)/blocks/mlp/add", "models/blocks.py", 89)
TRITON_CONFIG = 'backend_config={ir = "ML\\EFR}{\\22\\00", name = "lasad_chunk_fwd", num_stages = 3 : i32}'
MOSAIC_CONFIG = 'backend_config={module = "ML\\EFR\\00lasad_decode_2d\\00lasad_decode_2d_mosaic_gpu\\00"}'
# A GPU-style optimized module, as XLA dumps it (older metadata spelling: source_file/source_line): a loop fusion,
# a cuBLAS gemm custom call with a tuple shape, a Pallas Triton kernel, a Pallas Mosaic GPU kernel, and in a while
# loop's body (layers under scan) a Triton gemm fusion with a nested fusion.
GPU_HLO = f"""HloModule jit_train_step, entry_computation_layout={{(bf16[4,8]{{1,0}})->bf16[4,8]{{1,0}}}}

%fused_add.2 (param_0: bf16[4,8], param_1: bf16[4,8]) -> bf16[4,8] {{
  %param_0 = bf16[4,8]{{1,0}} parameter(0)
  %param_1 = bf16[4,8]{{1,0}} parameter(1)
  %multiply.3 = bf16[4,8]{{1,0}} multiply(%param_0, %param_1), {MUL}
  %multiply.4 = bf16[4,8]{{1,0}} multiply(%multiply.3, %param_1), {MUL}
  ROOT %add.5 = bf16[4,8]{{1,0}} add(%multiply.4, %param_1), {ADD}
}}

%fused_scale.1 (param_0.3: f32[4]) -> f32[4] {{
  %param_0.3 = f32[4]{{0}} parameter(0)
  ROOT %multiply.9 = f32[4]{{0}} multiply(%param_0.3, %param_0.3), {_metadata("scale/mul", "models/blocks.py", 40)}
}}

%gemm_computation.1 (param_0.2: f32[4]) -> f32[] {{
  %param_0.2 = f32[4]{{0}} parameter(0)
  %scale.1 = f32[4]{{0}} fusion(%param_0.2), kind=kCustom, calls=%fused_scale.1
  ROOT %dot.1 = f32[] dot(%scale.1, %scale.1), lhs_contracting_dims={{0}}, rhs_contracting_dims={{0}}, \
{_metadata("scale/dot_general", "models/blocks.py", 41)}
}}

%body.1 (carry: f32[4]) -> f32[] {{
  %carry = f32[4]{{0}} parameter(0)
  ROOT %gemm_fusion_dot.1 = f32[] fusion(%carry), kind=kCustom, calls=%gemm_computation.1
}}

%condition.1 (carry.1: f32[4]) -> pred[] {{
  %carry.1 = f32[4]{{0}} parameter(0)
  ROOT %constant.3 = pred[] constant(false)
}}

ENTRY %main.9 (p.1: bf16[4,8], c.1: f32[4]) -> bf16[4,8] {{
  %p.1 = bf16[4,8]{{1,0}} parameter(0), metadata={{op_name="tokens"}}
  %c.1 = f32[4]{{0}} parameter(1)
  %while.1 = f32[] while(%c.1), condition=%condition.1, body=%body.1
  %custom-call.7 = (bf16[4,8]{{1,0}}, s8[1024]{{0}}) custom-call(%p.1, %p.1), custom_call_target="__cublas$gemm", \
{_metadata("dot_general", "models/blocks.py", 70)}, backend_config={{"gemm_backend_config":{{"alpha_real":1}}}}
  %get-tuple-element.1 = bf16[4,8]{{1,0}} get-tuple-element(%custom-call.7), index=0
  %custom-call.9 = bf16[4,8]{{1,0}} custom-call(%get-tuple-element.1), custom_call_target="__gpu$xla.gpu.triton", \
{_metadata("pallas_call", "ops/lasad/kernels/chunk_gpu.py", 120)}, {TRITON_CONFIG}
  %custom-call.11 = bf16[4,8]{{1,0}} custom-call(%custom-call.9), custom_call_target="mosaic_gpu_v2", {MOSAIC_CONFIG}
  ROOT %loop_add_fusion.2 = bf16[4,8]{{1,0}} fusion(%custom-call.11, %p.1), kind=kLoop, calls=%fused_add.2, {ADD}
}}
"""


def test_gpu_style_hlo_fusions_gemms_and_pallas_kernels():
    fusions = device_profile.parse_hlo_fusions(GPU_HLO)
    assert sorted(fusions) == ["custom-call.11", "custom-call.7", "custom-call.9", "gemm_fusion_dot.1",
                               "loop_add_fusion.2"]
    fusion = fusions["loop_add_fusion.2"]
    assert (fusion["shape"], fusion["kind"], fusion["op_counts"]) == ("bf16[4,8]", "kLoop", {"multiply": 2, "add": 1})
    assert fusion["sources"] == [["blocks/mlp/mul", "models/blocks.py:88", 2],
                                 ["blocks/mlp/add", "models/blocks.py:89", 1]]
    gemm = fusions["custom-call.7"]
    assert (gemm["shape"], gemm["kind"], gemm["op_counts"]) == ("(bf16[4,8], s8[1024])", "__cublas$gemm", {})
    assert gemm["sources"] == [["jit(train_step)/dot_general", "models/blocks.py:70", 1]]
    assert fusions["custom-call.9"]["kernel"] == "lasad_chunk_fwd"
    loop_gemm = fusions["gemm_fusion_dot.1"]
    assert (loop_gemm["in_computation"], loop_gemm["op_counts"]) == ("body.1", {"multiply": 1, "dot": 1})
    assert [location for _, location, _ in loop_gemm["sources"]] == ["models/blocks.py:40", "models/blocks.py:41"]
    assert (fusions["custom-call.11"]["kernel"], fusions["custom-call.11"]["sources"]) == ("lasad_decode_2d", [])
    find = lambda name: [info["name"] for info in device_profile.find_instructions(fusions, name)]  # noqa: E731
    assert find("loop_add_fusion_2") == find("loop_add_fusion.2") == ["loop_add_fusion.2"]
    assert find("loop_add_fusion_20") == find("loop_add_fusion") == []
    assert find("lasad_chunk_fwd") == find("lasad_chunk_fwd_kernel") == ["custom-call.9"]
    assert find("lasad_decode_2d") == find("lasad_decode_2d_mosaic_gpu") == ["custom-call.11"]
    assert find("sm90_xmma_gemm_bf16bf16_bf16f32") == []


def test_command_line_describes_one_summary_and_a_diff(tmp_path, capsys):
    def summary(ops):
        return {"device_events": len(ops), "per": 2.0, "kernel_ms": sum(ops.values()),
                "top": [{"name": name, "ms": ms, "count": 1.0, "share": 0.0} for name, ms in ops.items()]}

    ops_path, hlo_path = tmp_path / "ops.json", tmp_path / "after_optimizations.txt.gz"
    ops_path.write_text(json.dumps({
        "before": summary({"loop_add_fusion_2": 3.0, "lasad_chunk_fwd": 1.0, "nvjet_gemm": 0.5}),
        "after": summary({"loop_add_fusion_2": 1.0, "lasad_chunk_fwd": 1.25, "loop_pad_fusion": 0.25})}))
    hlo_path.write_bytes(gzip.compress(GPU_HLO.encode()))
    device_profile.main(["--ops", str(ops_path), "--hlo", str(hlo_path), "--key", "after"])
    out = capsys.readouterr().out
    assert "loop_add_fusion.2: fusion kLoop -> bf16[4,8]; multiply 2, add 1" in out
    assert "kernels/chunk_gpu.py:120" in out and "nvjet_gemm" not in out

    device_profile.main(["--ops", str(ops_path), "--diff", "before", "after", "--hlo", str(hlo_path)])
    lines = capsys.readouterr().out.splitlines()[1:]
    rows = [line.split() for line in lines if re.match(r"\s*\S+\s+\S+\s+[+-]\d", line)]   # not the HLO lines
    assert [row[-1] for row in rows] == ["loop_add_fusion_2", "nvjet_gemm", "lasad_chunk_fwd", "loop_pad_fusion"]
    assert rows[0][:3] == ["3.000", "1.000", "-2.000"] and rows[1][:3] == ["0.500", "-", "-0.500"]

    with pytest.raises(SystemExit):
        device_profile.main(["--ops", str(ops_path), "--hlo", str(hlo_path), "--key", "missing"])
    assert "['after', 'before']" in capsys.readouterr().err
