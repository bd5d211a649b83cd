"""Warm-up before readiness: a session is announced (readiness SERVING) only once its warm-up ran,
and the warm-up reaches every kind of step (plain and chunked prefill, prefill over cached
blocks, mixed, decode) without counting in the server's statistics."""

from __future__ import annotations

import threading
import time

import pytest

from nanoserve import LLM
from scheduler_service import engine_loop as engine_loop_module
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.tokenizer import Tokenizer
from scheduler_service.warm_up import warm_up, warm_up_prompts
from tests.unit.test_step_trace_ownership import FlakyWorker


class Recorder:
    """EngineEvents that keeps what it is told."""

    def __init__(self) -> None:
        self.sessions: list[int] = []
        self.updates: list[tuple] = []

    def session(self, info, max_model_len, session) -> None:
        self.sessions.append(session)

    def lost(self, reason, session, stats) -> None:
        pass

    def refused(self, request_id, error) -> None:
        pass

    def update(self, outputs, stats, num_adds, step) -> None:
        self.updates.append((outputs, stats))


def test_a_session_is_announced_only_after_its_warm_up(monkeypatch) -> None:
    release, started = threading.Event(), threading.Event()

    def slow_warm_up(engine) -> None:
        started.set()
        assert release.wait(10)

    monkeypatch.setattr(engine_loop_module, "warm_up", slow_warm_up)
    config = SchedulerServiceConfig(model_dir="m", worker_addrs=("a:1",), ping_interval_s=0.01)
    events = Recorder()
    loop = EngineLoop(config, FlakyWorker(0), None, events)  # type: ignore[arg-type]
    loop.start()
    try:
        assert started.wait(10), "no warm-up ran"
        time.sleep(0.2)
        assert events.sessions == [], "announced while warming up"
        release.set()
        deadline = time.monotonic() + 10
        while not events.sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events.sessions == [1]
    finally:
        release.set()
        loop.stop()


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(
        str(tiny_model_dir),
        device="cpu",
        block_size=16,
        num_kv_blocks=512,
        max_num_seqs=16,
        max_num_batched_tokens=128,
        detokenize=False,
    )


def test_warm_up_runs_every_kind_of_step_and_leaves_every_block_free(llm) -> None:
    engine = llm.engine
    kinds: list[tuple[int, int, bool]] = []  # (sequences, tokens, any computed before) per step
    submit = engine.worker.submit

    def spy(plan) -> None:
        seqs = [engine._by_seq_id[i].seq for i in plan.seq_ids if i in engine._by_seq_id]
        computed = any(s.num_computed_tokens for s, n in zip(seqs, plan.num_new_tokens) if n > 1)
        kinds.append((len(plan.seq_ids), sum(plan.num_new_tokens), computed))
        submit(plan)

    engine.worker.submit = spy  # type: ignore[method-assign]
    try:
        hits_before = engine.scheduler.block_manager.num_cache_hit_tokens
        warm_up(engine)
    finally:
        engine.worker.submit = submit  # type: ignore[method-assign]
    assert not engine.has_unfinished
    lengths = [len(p) for p in warm_up_prompts(engine)]
    assert max(lengths) > engine.config.max_num_batched_tokens  # a chunked prefill
    assert 1 in lengths and engine.info.block_size in lengths
    assert engine.scheduler.block_manager.num_cache_hit_tokens > hits_before  # cached prefixes
    assert any(tokens > seqs and computed for seqs, tokens, computed in kinds)  # paged prefill
    assert any(tokens == seqs > 1 for seqs, tokens, _ in kinds)  # decode batches
    blocks = engine.scheduler.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks


def test_warm_up_detokenizes_so_that_no_user_request_builds_the_byte_table(tiny_model_dir) -> None:
    # The byte-level decode table is built on a tokenizer's first detokenization (milliseconds for
    # a 150k vocabulary): a warm-up without text left it to the first user's time to first token.
    llm = LLM(str(tiny_model_dir), device="cpu", num_kv_blocks=256, max_num_seqs=16)
    fresh = Tokenizer.from_dir(tiny_model_dir)
    assert fresh._byte_table is None  # built lazily
    llm.engine.tokenizer = fresh
    warm_up(llm.engine)
    assert fresh._byte_table is not None


def test_warm_up_prompts_fit_the_limits(llm) -> None:
    engine = llm.engine
    for prompt in warm_up_prompts(engine):
        assert 1 <= len(prompt) < engine.max_model_len
        assert all(0 <= t < engine.info.vocab_size for t in prompt)
