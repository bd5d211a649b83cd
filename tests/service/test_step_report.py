"""The benchmark step trace: the worker's per-step lines and the report that groups them, written
in-process (``LLM(step_trace=...)`` or ``$NANOSERVE_STEP_TRACE``) and by both services (the
variable, through their ``--step-trace`` flag)."""

from __future__ import annotations

import gc
import json
import time

import pytest

from bench.bound import kv_bytes_per_token, weight_bytes
from bench.checkpoint import QWEN3_0_6B
from bench.step_hops import (
    CLIENT_LEGS,
    LEGS,
    cycles,
    front_legs,
    print_hops,
    read_hops,
    stream_lags,
)
from bench.step_report import (
    print_prefill_steps,
    print_stalls,
    read_trace,
    stalled_steps,
    summarize,
    summarize_scheduler,
)
from nanoserve import LLM, SamplingParams
from protos.step_trace import HOPS, StepTrace
from tests.service_fixtures import generate, greedy, pb, running_services


def test_trace_lines_round_trip_and_the_report_groups_them_by_batch_size(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    trace = StepTrace(str(path))
    trace.add(4, 900, 900, 30.0, 5.0)  # prefill: more tokens than sequences
    trace.note("prep", 1.0)
    trace.note("prep", 0.5)
    trace.add(200, 200, 100_000, 6.0, 0.5)
    trace.note("prep", 2.5)
    trace.note("gap", 4.0)
    trace.add(250, 250, 120_000, 7.0, 0.0)
    trace.add(10, 10, 5_000, 1.5, 0.25)
    trace.flush()
    rows = read_trace(path)
    assert [r[1:] for r in rows][1] == [200, 200, 100_000, 6.0, 0.5, {"prep": 1.5}]
    assert rows[2][-1] == {"prep": 2.5, "gap": 4.0} and rows[3][-1] == {}  # notes go once
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
    assert big["host_ms"] == {"prep": pytest.approx(4.0), "gap": pytest.approx(4.0)}


def test_prefill_steps_are_listed_one_per_line(tmp_path, capsys) -> None:
    path = tmp_path / "steps.jsonl"
    trace = StepTrace(str(path))
    trace.note("prep", 1.5)  # a step's notes come before its line
    trace.add(4, 900, 900, 30.0, 5.0)
    trace.add(200, 200, 100_000, 6.0, 0.5)  # decode: not listed
    trace.add(3, 8192, 9000, 41.25, 0.0)
    trace.flush()
    print_prefill_steps(read_trace(path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["prefill", "step", "seqs", "tokens", "context", "busy", "ms"] + [
        "idle",
        "ms",
        "prep",
    ]
    assert lines[1].split() == ["0", "4", "900", "900", "30.00", "5.00", "1.50"]
    assert lines[2].split() == ["1", "3", "8192", "9000", "41.25", "0.00", "0.00"]
    assert len(lines) == 3


def test_stalled_steps_come_with_the_scheduler_lines_written_meanwhile(capsys) -> None:
    worker = [
        [100.000, 1, 1, 500, 0.9, 0.02, {"prep": 0.1}],
        [100.001, 1, 1, 501, 0.9, 0.03, {}],
        [100.008, 1, 1, 502, 0.9, 6.50, {"plan_wait": 6.4, "prep": 0.1}],  # the stall
        [100.009, 1, 1, 503, 0.9, 1.00, {}],  # exactly the threshold: not a stall
    ]
    scheduler = [
        [100.0005, 1, {"loop": 0.1}],  # before the stalled step's window
        [100.0020, 1, {"loop": 5.9, "plan": 0.2, "gc": 0.01}],
        [100.0070, 1, {"receive": 0.3}],
        [100.0085, 1, {"loop": 0.1}],  # after it
    ]
    stalls = stalled_steps(worker, scheduler, 1.0)
    assert [(s["idle_ms"], s["seqs"]) for s in stalls] == [(6.5, 1)]
    assert stalls[0]["worker"] == {"plan_wait": 6.4, "prep": 0.1}
    assert stalls[0]["scheduler"] == [{"loop": 5.9, "plan": 0.2, "gc": 0.01}, {"receive": 0.3}]
    print_stalls(stalls, 1.0, worker[0][0])
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[1].split()
        == (
            "0.008 s 1 seqs idle 6.50 ms | plan_wait=6.40 prep=0.10 | loop=5.90 plan=0.20 ; "
            "receive=0.30"
        ).split()
    )
    assert stalled_steps(worker, scheduler, 7.0) == []


def test_trace_file_is_appended_in_batches(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    trace = StepTrace(str(path))
    for i in range(300):
        trace.add(1, 1, i, 1.0, 0.0)
    lines = path.read_text().splitlines()  # 256 written without an explicit flush
    assert len(lines) == 256 and json.loads(lines[-1])[3] == 255
    trace.flush()
    assert len(path.read_text().splitlines()) == 300


def _check_traces(
    path, num_tokens: int, num_seqs: int, worker_phases: set[str], since: float = 0.0
) -> None:
    """Every sampled token is in one scheduler line; worker lines carry shapes and host phases.
    ``since``: the lines of the steps after it (a service's warm-up steps come before)."""
    worker_rows = read_trace(path, since)
    scheduler_rows = read_trace(f"{path}.scheduler", since)
    assert sum(row[1] for row in scheduler_rows) == num_tokens
    assert all(set(row[-1]) >= {"plan", "receive", "outputs"} for row in scheduler_rows)
    assert all(row[-1]["receive"] >= 0 for row in scheduler_rows)
    decode = [row for row in worker_rows if row[2] == row[1]]  # one token per sequence
    assert decode and decode[0][1] == num_seqs
    phases = set().union(*(row[-1] for row in worker_rows[1:]))
    assert phases >= worker_phases, phases
    groups = summarize_scheduler(scheduler_rows)
    assert sum(g["steps"] for g in groups) == len(scheduler_rows)


@pytest.mark.parametrize("from_env", [False, True])
def test_in_process_engine_traces_worker_and_scheduler_steps(
    tiny_model_dir, tmp_path, monkeypatch, from_env: bool
) -> None:
    path = tmp_path / "steps.jsonl"
    callbacks = list(gc.callbacks)
    if from_env:
        monkeypatch.setenv("NANOSERVE_STEP_TRACE", str(path))
    options = {} if from_env else {"step_trace": str(path)}
    llm = LLM(str(tiny_model_dir), device="cpu", block_size=16, num_kv_blocks=64, **options)
    monkeypatch.delenv("NANOSERVE_STEP_TRACE", raising=False)  # read once, in the constructor
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([[1, 2, 3], [4, 5], [6, 7, 8, 9]], params, use_tqdm=False)
    llm.close()
    assert gc.callbacks == callbacks
    num_tokens = sum(len(o["token_ids"]) for o in outputs)
    _check_traces(path, num_tokens, 3, {"gap", "prep", "wait", "collect"})


def test_an_llm_dropped_without_close_removes_its_trace_hooks(tiny_model_dir, tmp_path) -> None:
    callbacks = list(gc.callbacks)
    llm = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=8, step_trace=str(tmp_path / "t"))
    assert len(gc.callbacks) == len(callbacks) + 2  # the worker's trace and the engine's
    del llm
    gc.collect()
    assert gc.callbacks == callbacks


def test_worker_service_traces_its_grpc_phases(tiny_model_dir, tmp_path, monkeypatch) -> None:
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("NANOSERVE_STEP_TRACE", str(path))
    with running_services(tiny_model_dir, tmp_path / "run", num_kv_blocks=64) as services:
        serving_since = time.time()  # the warm-up's steps are older
        sampling = greedy(6, ignore_eos=True)
        replies = generate(services.stub, token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=sampling)
    num_tokens = len(replies[-1].complete.output_ids)
    phases = {"plan_wait", "decode", "encode", "gap", "prep", "wait", "collect"}
    _check_traces(path, num_tokens, 1, phases, since=serving_since)
    steps = read_hops(path)  # the services are stopped: every line is written
    served = {i: h for i, h in steps.items() if h.get("sent", 0) >= serving_since}
    assert len(served) >= num_tokens  # a step a token, each of its plan and answer stamped
    assert all(set(h) == set(HOPS) for h in list(served.values())[:-1]), served
    for h in served.values():  # the plan's way in order, then its answer's
        times = [h[hop] for hop in HOPS if hop in h]
        assert times == sorted(times), h
    ways = [c for c in cycles(steps) if c["at"] >= serving_since]
    assert len(ways) >= num_tokens - 3  # the last two answers come after the last plan
    for c in ways:
        assert min(c[leg] for leg in LEGS) >= 0
        assert sum(c[leg] for leg in LEGS) == pytest.approx(c["total"])
    # Every answer with tokens went on to the front end's loop (the front end's own file).
    assert (path.parent / "steps.jsonl.front.hops").exists()
    answers = [h for h in served.values() if "answered" in h]
    assert len(answers) == num_tokens and all("dispatched" in h for h in answers)
    assert len(front_legs(served)) == num_tokens


def test_the_way_between_steps_is_cut_into_legs_per_hand_off(tmp_path, capsys) -> None:
    path = tmp_path / "steps.jsonl"
    worker, scheduler = StepTrace(str(path)), StepTrace(f"{path}.scheduler")
    front = StepTrace(f"{path}.front")
    stamps = {  # step 1's answer leaves at 10.0; step 2's plan (queued after it) arrives 6.5 ms on
        1: {
            "replied": 10.000,
            "answered": 10.0010,
            "published": 10.0012,  # its outputs: 0.2 ms to the pipe, 0.3 over it, 0.5 to the loop
            "received": 10.0015,
            "dispatched": 10.0020,
        },
        2: {"sent": 10.0015, "taken": 10.0020, "read": 10.0060, "handled": 10.0070},
        0: {"replied": 10.0065},  # the handler was busy until then: its leg starts here
        3: {"sent": 10.0090},  # queued after no answer: no way
        -1: {"replied": 9.0, "answered": 9.1},  # the first deferred answer: left out
    }
    for step_id, hops in stamps.items():
        for hop, at in hops.items():
            owner = worker if hop in ("read", "handled", "replied") else scheduler
            owner = front if hop in ("received", "dispatched") else owner
            owner._hops.append(json.dumps([step_id, hop, at]))
    for trace in (worker, scheduler, front):
        trace.flush()
    steps = read_hops(path)
    assert set(steps) == {0, 1, 2, 3} and steps[2]["read"] == 10.006
    [way] = cycles(steps)
    expected = {"answer": 1.0, "turn": 0.5, "queue": 0.5, "wire": 4.0, "handler": 0.5}
    assert {leg: round(way[leg], 6) for leg in LEGS} == expected
    assert way["total"] == pytest.approx(6.5)
    [legs] = front_legs(steps)
    assert {leg: round(legs[leg], 6) for leg in CLIENT_LEGS[:-1]} == {
        "outputs": 0.2,
        "pipe": 0.3,
        "loop": 0.5,
    }
    assert stream_lags(steps, [[10.0015, 1], [10.0030, 2]]) == [pytest.approx(1.0)]
    print_hops(steps, 5.0, [[10.0030, 2]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[4].split() == ["wire", "4.000", "4.000", "4.000"]
    assert lines[7].split() == ["client:", "outputs", "0.200", "0.200", "0.200"]
    assert lines[10].split() == ["client:", "stream", "1.000", "1.000", "1.000"]
    assert lines[-1].split() == (
        "0.000 s total 6.50 | answer=1.00 turn=0.50 queue=0.50 wire=4.00 handler=0.50".split()
    )


def test_garbage_collections_are_noted_while_the_trace_is_started(tmp_path) -> None:
    with StepTrace(str(tmp_path / "steps.jsonl")) as trace:
        gc.collect()
        trace.add(1, 1, 1, 1.0, 0.0)
    gc.collect()
    trace.add(1, 1, 1, 1.0, 0.0)  # closed: collections go unnoted
    trace.flush()
    first, second = read_trace(tmp_path / "steps.jsonl")
    assert first[-1]["gc"] > 0 and "gc" not in second[-1]
