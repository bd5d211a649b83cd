"""vLLM's engine protocol, the prefix-cache RPCs: FlushCache and SubscribeKvEvents over gRPC.

Real processes (a CPU worker and the scheduler, running_services), raw gRPC with the stubs of
``smg-grpc-proto``. FlushCache: a repeated prompt hits the cache before the flush and misses it
after; a flush while a request holds blocks is refused at once and succeeds with a timeout that
outlasts the request. SubscribeKvEvents: a prompt's full blocks arrive as stored events (their
token ids, block size, chained hashes and parent), a flush as their removal, to every subscriber.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from smg_grpc_proto.generated import common_pb2 as cpb
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from scheduler_service.block_manager import chain_hash
from scheduler_service.vllm_cache import to_int64
from tests.service_fixtures import BLOCK_SIZE, Services, running_services

NUM_KV_BLOCKS = 64
PROMPT_IDS = list(range(100, 140))  # two full blocks of 16 and a part


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    run_dir = tmp_path_factory.mktemp("vllm_cache_services")
    with running_services(tiny_model_dir, run_dir, NUM_KV_BLOCKS) as services:
        yield services


@pytest.fixture
def engine(services: Services) -> vllm_engine_pb2_grpc.VllmEngineStub:
    stub = vllm_engine_pb2_grpc.VllmEngineStub(services.channel)
    assert stub.FlushCache(cpb.FlushCacheRequest(timeout_s=10), timeout=20).success
    return stub


def run_greedy(
    engine: vllm_engine_pb2_grpc.VllmEngineStub, ids: list[int], max_tokens: int = 2
) -> vpb.GenerateComplete:
    sampling = vpb.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    request = vpb.GenerateRequest(
        tokenized=vpb.TokenizedInput(input_ids=ids), sampling_params=sampling
    )
    return list(engine.Generate(request, timeout=60))[-1].complete


def flush(engine: vllm_engine_pb2_grpc.VllmEngineStub, timeout_s: float) -> cpb.FlushCacheResponse:
    return engine.FlushCache(cpb.FlushCacheRequest(timeout_s=timeout_s), timeout=timeout_s + 30)


def test_a_repeated_prompt_hits_the_cache_before_a_flush_and_not_after(
    engine: vllm_engine_pb2_grpc.VllmEngineStub,
) -> None:
    assert run_greedy(engine, PROMPT_IDS).cached_tokens == 0
    assert run_greedy(engine, PROMPT_IDS).cached_tokens == 2 * BLOCK_SIZE
    answer = flush(engine, 0)
    assert answer.success, answer.message
    assert run_greedy(engine, PROMPT_IDS).cached_tokens == 0


def test_a_flush_while_a_request_holds_blocks_is_refused_or_waits_for_it(
    engine: vllm_engine_pb2_grpc.VllmEngineStub,
) -> None:
    run_greedy(engine, PROMPT_IDS)
    sampling = vpb.SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    request = vpb.GenerateRequest(
        tokenized=vpb.TokenizedInput(input_ids=[5, 6, 7]), sampling_params=sampling, stream=True
    )
    responses = engine.Generate(request, timeout=60)
    assert next(responses).HasField("chunk")  # it runs: it holds a block
    refused = flush(engine, 0)
    assert not refused.success and "in use" in refused.message
    assert run_greedy(engine, PROMPT_IDS).cached_tokens == 2 * BLOCK_SIZE  # nothing was flushed
    waited = flush(engine, 30)  # the request finishes within it
    assert waited.success, waited.message
    assert list(responses)[-1].complete.finish_reason == "length"
    assert run_greedy(engine, PROMPT_IDS).cached_tokens == 0


@contextmanager
def subscribed(
    engine: vllm_engine_pb2_grpc.VllmEngineStub,
) -> Iterator[queue.Queue[cpb.KvCacheEvent]]:
    """A live subscription's events, in order; live once a priming prompt's blocks arrive."""
    events: queue.Queue[cpb.KvCacheEvent] = queue.Queue()
    call = engine.SubscribeKvEvents(cpb.SubscribeKvEventsRequest(), timeout=300)

    def read() -> None:
        try:
            last = 0
            for batch in call:
                assert batch.sequence_number > last
                last = batch.sequence_number
                for event in batch.events:
                    events.put(event)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.CANCELLED, e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for attempt in range(50):  # the subscription joins asynchronously
            run_greedy(engine, [200 + attempt] * BLOCK_SIZE + [1])
            if next_stored(events, 0.2) is not None:
                break
        else:
            raise AssertionError("no KV event after 50 priming prompts")
        yield events
    finally:
        call.cancel()
        reader.join(10)


def next_stored(events: queue.Queue[cpb.KvCacheEvent], timeout_s: float) -> cpb.KvCacheEvent | None:
    try:
        while True:
            event = events.get(timeout=timeout_s)
            if event.HasField("stored"):
                return event
    except queue.Empty:
        return None


def drain(events: queue.Queue[cpb.KvCacheEvent], timeout_s: float = 1.0) -> list[cpb.KvCacheEvent]:
    found = []
    try:
        while True:
            found.append(events.get(timeout=timeout_s))
    except queue.Empty:
        return found


def test_a_prompts_blocks_are_stored_events_and_a_flush_removes_them(
    engine: vllm_engine_pb2_grpc.VllmEngineStub,
) -> None:
    h0 = chain_hash(-1, PROMPT_IDS[:BLOCK_SIZE])
    h1 = chain_hash(h0, PROMPT_IDS[BLOCK_SIZE : 2 * BLOCK_SIZE])
    with subscribed(engine) as first, subscribed(engine) as second:
        drain(first, 0.2), drain(second, 0.2)
        run_greedy(engine, PROMPT_IDS)
        for events in (first, second):
            stored = [e.stored for e in drain(events) if e.HasField("stored")]
            assert len(stored) == 1 and not stored[0].HasField("parent_block_hash")
            blocks = stored[0].blocks
            assert [b.block_hash for b in blocks] == [to_int64(h0), to_int64(h1)]
            assert [list(b.token_ids) for b in blocks] == [
                PROMPT_IDS[:BLOCK_SIZE],
                PROMPT_IDS[BLOCK_SIZE : 2 * BLOCK_SIZE],
            ]
            assert all(b.block_size == BLOCK_SIZE for b in blocks)
        assert flush(engine, 10).success
        for events in (first, second):
            removed = {h for e in drain(events) for h in e.removed.block_hashes}
            assert {to_int64(h0), to_int64(h1)} <= removed


def test_a_continued_prompt_is_stored_with_its_parent_hash(
    engine: vllm_engine_pb2_grpc.VllmEngineStub,
) -> None:
    with subscribed(engine) as events:
        run_greedy(engine, PROMPT_IDS[:20])  # one full block
        drain(events)
        run_greedy(engine, PROMPT_IDS)  # hits it, stores the second
        stored = [e.stored for e in drain(events) if e.HasField("stored")]
    h0 = chain_hash(-1, PROMPT_IDS[:BLOCK_SIZE])
    assert len(stored) == 1 and stored[0].parent_block_hash == to_int64(h0)
    h1 = chain_hash(h0, PROMPT_IDS[BLOCK_SIZE : 2 * BLOCK_SIZE])
    assert [b.block_hash for b in stored[0].blocks] == [to_int64(h1)]
