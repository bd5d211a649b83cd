"""A host's floor for the step stream: round trips of an echo over one gRPC stream between two
processes, with nothing else running, so that a stalling host can be told from a slow engine.

The server answers each message at once with its bytes (the worker's shape with ``sync``: a
thread pool, a reader thread handing each request to the handler; with ``aio``: asyncio on both
ends). ``--busy-us`` adds a thread that holds the server's GIL that long out of every
``--period-us`` (as the worker's step launches do). The client keeps one message in flight and
waits 0.3 ms between them (a scheduler's turn).

    python -m bench.stream_rtt [--modes sync,aio] [--addrs tcp,unix] [--n 3000] [--busy-us 0,600]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import cast

import grpc

from protos.nanoserve.worker.v1 import worker_pb2 as pb
from worker_service.servicer import read_ahead

SERVICE, METHOD = "nanoserve.bench.Echo", "Stream"
PAYLOAD = bytes(range(200))  # about a batch-1 plan's size


def _hold_gil(busy_us: int, period_us: int) -> None:
    while True:
        start = time.perf_counter()
        while time.perf_counter() - start < busy_us / 1e6:
            pass
        time.sleep(max(0, period_us - busy_us) / 1e6)


def _handler(stream) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(stream)}
    )


def _sync_stream(requests: Iterator[bytes], context) -> Iterator[bytes]:
    """The worker's StepStream without the step: its reader thread, then the echo. (Untraced,
    the reader never looks inside a message: raw bytes pass as the worker's requests.)"""
    received = read_ahead(cast(Iterator[pb.StepRequest], requests))
    while (request := received.get()) is not None:
        yield cast(bytes, request)


async def _aio_stream(requests, context):
    async for request in requests:
        yield request


def _serve(mode: str, addr: str, ready, busy_us: int, period_us: int) -> None:
    if busy_us:
        threading.Thread(target=_hold_gil, args=(busy_us, period_us), daemon=True).start()
    if mode == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(4))
        server.add_generic_rpc_handlers((_handler(_sync_stream),))
        server.add_insecure_port(addr)
        server.start()
        ready.set()
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(_aio_stream),))
        server.add_insecure_port(addr)
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _sync_client(addr: str, n: int) -> list[float]:
    with grpc.insecure_channel(addr) as channel:
        sent: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        replies = channel.stream_stream(f"/{SERVICE}/{METHOD}")(iter(sent.get, None))
        rtts = []
        for _ in range(n):
            start = time.perf_counter()
            sent.put(PAYLOAD)
            if next(replies) != PAYLOAD:
                raise AssertionError("the echo changed the message")
            rtts.append(time.perf_counter() - start)
            time.sleep(0.0003)
        sent.put(None)
        return rtts


def _aio_client(addr: str, n: int) -> list[float]:
    async def main() -> list[float]:
        async with grpc.aio.insecure_channel(addr) as channel:
            call = channel.stream_stream(f"/{SERVICE}/{METHOD}")()
            rtts = []
            for _ in range(n):
                start = time.perf_counter()
                await call.write(PAYLOAD)
                if await call.read() != PAYLOAD:
                    raise AssertionError("the echo changed the message")
                rtts.append(time.perf_counter() - start)
                time.sleep(0.0003)
            await call.done_writing()
            return rtts

    return asyncio.run(main())


def _address(kind: str, folder: str) -> str:
    if kind == "unix":
        return f"unix:{folder}/echo.sock"
    with socket.socket() as s:  # a free port the OS picks
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def round_trips(mode: str, kind: str, n: int, busy_us: int = 0, period_us: int = 1000) -> list:
    """``n`` round trips in seconds (after 200 unmeasured), ``mode`` sync or aio on both ends,
    over ``kind`` tcp (loopback) or unix (a socket file)."""
    with tempfile.TemporaryDirectory() as folder:
        addr = _address(kind, folder)
        spawn = mp.get_context("spawn")
        ready = spawn.Event()
        server = spawn.Process(
            target=_serve, args=(mode, addr, ready, busy_us, period_us), daemon=True
        )
        server.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("the echo server did not start")
            client = _sync_client if mode == "sync" else _aio_client
            client(addr, 200)
            return client(addr, n)
        finally:
            server.kill()
            server.join()


def quantiles(rtts: list[float]) -> dict[str, float]:
    ms = sorted(1e3 * r for r in rtts)
    at = lambda q: ms[int(q * (len(ms) - 1))]  # noqa: E731
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ms[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="sync,aio")
    parser.add_argument("--addrs", default="tcp,unix")
    parser.add_argument("--busy-us", default="0,600", help="GIL held per period, server side")
    parser.add_argument("--period-us", type=int, default=1000)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    title = f"round trip ms, {os.cpu_count()} CPUs"
    print(f"{title:<28}" + "".join(f"{c:>8}" for c in quantiles([0.0])))
    for mode in args.modes.split(","):
        for kind in args.addrs.split(","):
            for busy in map(int, args.busy_us.split(",")):
                q = quantiles(round_trips(mode, kind, args.n, busy, args.period_us))
                label = f"{mode} {kind} busy {busy} us"
                print(f"{label:<28}" + "".join(f"{v:>8.3f}" for v in q.values()))


if __name__ == "__main__":
    main()
