"""bench.stream_rtt: a real echo server in its own process, both gRPC flavours, both socket kinds."""

from __future__ import annotations

import pytest

from bench.stream_rtt import quantiles, round_trips


@pytest.mark.parametrize("mode", ["sync", "aio"])
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_round_trips_are_timed_over_a_real_echo(mode: str, kind: str) -> None:
    rtts = round_trips(mode, kind, 30, busy_us=200)
    assert len(rtts) == 30 and all(0 < r < 5.0 for r in rtts)


def test_quantiles_are_in_milliseconds_of_the_sorted_times() -> None:
    q = quantiles([0.004, 0.001, 0.002, 0.003])
    assert q == {"p50": 2.0, "p90": 3.0, "p99": 3.0, "max": 4.0}
