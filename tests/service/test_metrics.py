"""Prometheus metrics: the Metrics API on its own, then /metrics of a live scheduler after traffic.

The first group drives scheduler_service.metrics with a fake clock and fake stats and scrapes its
HTTP endpoint. The second starts real services with ``--metrics-port`` and checks that counters
and histograms moved by exactly what the traffic implies; it skips until the scheduler has that
flag (the call sites are listed in metrics.py's docstring).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanoserve.launcher import free_port
from scheduler_service.engine_loop import ServerStats
from scheduler_service.metrics import Metrics
from scheduler_service.stop_checker import FinishReason
from tests.service_fixtures import (
    Services,
    generate,
    greedy,
    pb,
    running_services,
    wait_for,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- the Metrics API ---------------------------------------------------------------------------


@pytest.fixture
def metrics() -> Iterator[tuple[Metrics, int]]:
    m = Metrics()
    yield m, m.start_http_server(0, "127.0.0.1")


def test_request_timer_observes_ttft_inter_token_and_e2e_latency(
    metrics: tuple[Metrics, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    m, port = metrics
    clock = FakeClock()
    timer = m.track_request()
    timer._clock, timer.start_s = clock, clock.now

    clock.now += 0.5
    timer.on_tokens(1)  # first token after 0.5 s
    clock.now += 0.3
    timer.on_tokens(3)  # three tokens 0.1 s apart
    clock.now += 0.2
    timer.on_finish(FinishReason.LENGTH)
    timer.on_finish(FinishReason.LENGTH)  # counted once

    s = scrape(port)
    assert value(s, "nanoserve_time_to_first_token_seconds_count") == 1
    assert value(s, "nanoserve_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value(s, "nanoserve_inter_token_latency_seconds_count") == 3
    assert value(s, "nanoserve_inter_token_latency_seconds_sum") == pytest.approx(0.3)
    assert value(s, "nanoserve_e2e_request_latency_seconds_count") == 1
    assert value(s, "nanoserve_e2e_request_latency_seconds_sum") == pytest.approx(1.0)
    assert value(s, "nanoserve_request_output_tokens_sum") == 4
    assert value(s, "nanoserve_requests_total", finish_reason="length") == 1
    assert value(s, "nanoserve_requests_total", finish_reason="stop") == 0


def test_finish_reasons_are_counted_by_label(metrics: tuple[Metrics, int]) -> None:
    m, port = metrics
    for reason in ("stop", "stop", FinishReason.ABORT, None, "LENGTH"):
        m.track_request().on_finish(reason)

    s = scrape(port)
    counts = {r: value(s, "nanoserve_requests_total", finish_reason=r) for r in ("stop", "length")}
    assert counts == {"stop": 2, "length": 1}
    assert value(s, "nanoserve_requests_total", finish_reason="abort") == 1
    assert value(s, "nanoserve_requests_total", finish_reason="error") == 1


def test_server_state_is_read_from_the_stats_at_scrape_time(metrics: tuple[Metrics, int]) -> None:
    m, port = metrics
    stats = ServerStats(
        ready=True, num_waiting=3, num_running=5, total_blocks=100, free_blocks=60,
        num_preemptions=2, num_generated_tokens=40, num_cache_hit_tokens=16,
        num_cache_query_tokens=64,
    )  # fmt: skip
    current = [stats]
    m.track_stats(lambda: current[0])
    m.observe_step(0.004)

    s = scrape(port)
    assert value(s, "nanoserve_num_requests_running") == 5
    assert value(s, "nanoserve_num_requests_waiting") == 3
    assert value(s, "nanoserve_kv_blocks_used") == 40
    assert value(s, "nanoserve_kv_cache_usage_ratio") == pytest.approx(0.4)
    assert value(s, "nanoserve_prefix_cache_hit_rate") == pytest.approx(0.25)
    assert value(s, "nanoserve_preemptions_total") == 2
    assert value(s, "nanoserve_generation_tokens_total") == 40
    assert value(s, "nanoserve_step_time_seconds_count") == 1

    current[0] = dataclasses.replace(stats, num_preemptions=7, free_blocks=100)
    s = scrape(port)
    assert value(s, "nanoserve_preemptions_total") == 7
    assert value(s, "nanoserve_kv_blocks_used") == 0


# ---- a live scheduler --------------------------------------------------------------------------

LONG_PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)


def scheduler_has_metrics_port() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "scheduler_service", "--help"], capture_output=True, text=True
    )
    return "--metrics-port" in done.stdout


@pytest.fixture(scope="module")
def live(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Services, int]]:
    if not scheduler_has_metrics_port():
        pytest.skip(
            "scheduler_service has no --metrics-port yet (see scheduler_service/metrics.py)"
        )
    port = free_port()
    run_dir = tmp_path_factory.mktemp("metrics")
    with running_services(tiny_model_dir, run_dir, 64, ["--metrics-port", str(port)]) as services:
        yield services, port


def test_metrics_move_by_the_traffic_sent(live: tuple[Services, int]) -> None:
    services, port = live
    before = scrape(port)

    lengths = [generate(services.stub, text=p, sampling=greedy(5), stream=True)[-1].complete
               for p in ("Hello world", "Once upon a time", LONG_PROMPT)]  # fmt: skip
    first_id = lengths[0].output_ids[0]
    stop = generate(services.stub, text="Hello world",
                    sampling=greedy(5, stop_token_ids=[first_id]))[-1].complete  # fmt: skip
    cached = generate(services.stub, text=LONG_PROMPT, sampling=greedy(5))[-1].complete
    aborted = abort_mid_stream(services)
    wait_for(lambda: services.status().num_running_requests == 0, 10, "the abort to land")

    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    completes = [*lengths, stop, cached]
    assert [c.finish_reason for c in completes] == [pb.LENGTH] * 3 + [pb.STOP, pb.LENGTH]
    assert delta("nanoserve_requests_total", finish_reason="length") == 4
    assert delta("nanoserve_requests_total", finish_reason="stop") == 1
    assert delta("nanoserve_requests_total", finish_reason="abort") == 1
    assert delta("nanoserve_e2e_request_latency_seconds_count") == 6
    assert delta("nanoserve_time_to_first_token_seconds_count") == 6  # the aborted one had one
    num_tokens = sum(c.usage.completion_tokens for c in completes) + aborted
    num_gaps = sum(c.usage.completion_tokens - 1 for c in completes) + aborted - 1
    assert delta("nanoserve_inter_token_latency_seconds_count") == num_gaps
    assert delta("nanoserve_request_output_tokens_sum") == num_tokens
    assert delta("nanoserve_generation_tokens_total") >= num_tokens
    assert delta("nanoserve_prefix_cache_hit_tokens_total") >= cached.usage.cached_tokens > 0
    assert delta("nanoserve_step_time_seconds_count") > 0
    assert value(after, "nanoserve_worker_memory_bytes") > 10 * 2**20  # a CPU worker's RSS
    assert (
        0
        < delta("nanoserve_worker_step_time_seconds_count")
        <= delta("nanoserve_step_time_seconds_count")
    )

    status = services.status()
    assert value(after, "nanoserve_preemptions_total") == status.num_preemptions
    assert value(after, "nanoserve_prefix_cache_hit_tokens_total") == (
        status.num_prefix_cache_hit_tokens
    )
    assert value(after, "nanoserve_kv_blocks_total") == status.total_blocks
    assert value(after, "nanoserve_num_requests_running") == 0
    assert value(after, "nanoserve_num_requests_waiting") == 0
    assert value(after, "nanoserve_kv_blocks_used") == 0


def abort_mid_stream(services: Services) -> int:
    """Start a long stream, abort it after its first chunk; return the tokens it received."""
    request = pb.GenerateRequest(
        request_id="metrics-abort", text="Hello", sampling=greedy(900, ignore_eos=True),
        stream=True,
    )  # fmt: skip
    num_tokens = 0
    stream = services.stub.Generate(request, timeout=60)
    try:
        for response in stream:
            if response.HasField("chunk"):
                num_tokens += len(response.chunk.token_ids)
                if num_tokens and num_tokens == len(response.chunk.token_ids):
                    services.stub.Abort(pb.AbortRequest(request_ids=["metrics-abort"]), timeout=5)
            else:
                num_tokens = len(response.complete.output_ids)
                assert response.complete.finish_reason == pb.ABORT
    except grpc.RpcError as e:  # pragma: no cover - the stream must end with Complete(ABORT)
        raise AssertionError(f"aborted stream ended with {e.code()}") from e
    return num_tokens
