"""benchmarks/device_profile.py: the trace summary counts device stream operations only, once each."""

import os
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
