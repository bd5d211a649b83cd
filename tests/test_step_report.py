"""The benchmark step trace: the worker's per-step lines and the report that groups them."""

from __future__ import annotations

import json

import pytest

from bench.bound import kv_bytes_per_token, weight_bytes
from bench.checkpoint import QWEN3_0_6B
from bench.step_report import read_trace, summarize
from worker_service.step_trace import StepTrace


def test_trace_lines_round_trip_and_the_report_groups_them_by_batch_size(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    trace = StepTrace(str(path))
    trace.add(4, 900, 900, 30.0, 5.0)  # prefill: more tokens than sequences
    trace.add(200, 200, 100_000, 6.0, 0.5)
    trace.add(250, 250, 120_000, 7.0, 0.0)
    trace.add(10, 10, 5_000, 1.5, 0.25)
    trace.flush()
    rows = read_trace(path)
    assert [r[1:] for r in rows][1] == [200, 200, 100_000, 6.0, 0.5]
    assert read_trace(path, since=rows[-1][0] + 1) == []

    bandwidth = 4e12
    groups = {g["group"]: g for g in summarize(rows, QWEN3_0_6B, bandwidth)}
    assert set(groups) == {"prefill/mixed", "decode 193-max", "decode 1-16"}
    big = groups["decode 193-max"]
    assert big["steps"] == 2
    assert big["busy_s"] == pytest.approx(0.013) and big["idle_s"] == pytest.approx(0.0005)
    expected = (2 * weight_bytes(QWEN3_0_6B) + 220_000 * kv_bytes_per_token(QWEN3_0_6B)) / bandwidth
    assert big["bound_s"] == pytest.approx(expected)
    assert groups["decode 1-16"]["idle_s"] == pytest.approx(0.00025)


def test_trace_file_is_appended_in_batches(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    trace = StepTrace(str(path))
    for i in range(300):
        trace.add(1, 1, i, 1.0, 0.0)
    lines = path.read_text().splitlines()  # 256 written without an explicit flush
    assert len(lines) == 256 and json.loads(lines[-1])[3] == 255
    trace.flush()
    assert len(path.read_text().splitlines()) == 300
