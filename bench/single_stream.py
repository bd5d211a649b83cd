"""Single-user latency as a user sees it: one streaming request at a time through the services.

    python -m bench.single_stream [--arch qwen3-0.6b] [--requests 5] [--prompt-tokens 100]
                                  [--max-tokens 1024] [--step-trace PATH] [--worker-args ARGS]

The worker and the scheduler start by their documented commands with default flags (as
bench.user_path starts them); after SERVING, each request (a random prompt of ``--prompt-tokens``
ids, greedy, ``--max-tokens`` tokens, ignore_eos) is sent alone and streamed to its end before the
next, on one channel (its connection, made first, is reported apart as ``connect_ms``).
Reported: TTFT per request, inter-token latency (the gap between consecutive streamed chunks,
each chunk counted once per token it carries) p50 / p99 / max over all requests, the stalls
(gaps over 3x the median) with the token position they came at, and tokens per second of one
stream. ``--step-trace`` makes the services trace every step (bench.step_report reads it) and
writes each chunk's arrival beside it (PATH.client, wall clock: bench.step_hops);
``--worker-args`` adds worker flags, for a side-by-side run against the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import grpc

from bench import user_path
from bench.checkpoint import add_checkpoint_args, checkpoint_from_args
from bench.step_hops import CLIENT_SUFFIX
from nanoserve import launcher
from protos.nanoserve.v1 import generation_pb2 as pb
from protos.nanoserve.v1 import generation_pb2_grpc as pb_grpc


async def stream_one(stub, request: pb.GenerateRequest) -> tuple[float, list[tuple[float, int]]]:
    """Send one request, read it to its end: (send time, [(arrival, tokens in the chunk)])."""
    start = time.perf_counter()
    arrivals = []
    async for reply in stub.Generate(request):
        if reply.HasField("chunk") and reply.chunk.token_ids:
            arrivals.append((time.perf_counter(), len(reply.chunk.token_ids)))
    return start, arrivals


async def run(addr: str, requests: list[pb.GenerateRequest]) -> tuple[float, list]:
    """The channel's connection time (ms), then each request's send time and arrivals."""
    async with grpc.aio.insecure_channel(addr) as channel:
        start = time.perf_counter()
        await channel.channel_ready()
        connect_ms = 1e3 * (time.perf_counter() - start)
        stub = pb_grpc.GenerationStub(channel)
        return connect_ms, [await stream_one(stub, r) for r in requests]


def write_arrivals(path: str, results: list) -> None:
    """Each chunk's arrival on the wall clock (the services' traces use it) and its tokens."""
    offset = time.time() - time.perf_counter()
    with open(path, "w") as f:
        for _, arrivals in results:
            f.writelines(json.dumps([offset + at, n]) + "\n" for at, n in arrivals)


def summarize(results: list) -> dict:
    ttfts, gaps, stalls, rates = [], [], [], []
    for start, arrivals in results:
        ttfts.append(1e3 * (arrivals[0][0] - start))
        position = arrivals[0][1]
        for (a, _), (b, n) in zip(arrivals, arrivals[1:]):
            gaps += [1e3 * (b - a) / n] * n
            stalls.append((1e3 * (b - a), position))
            position += n
        tokens = sum(n for _, n in arrivals)
        rates.append(tokens / (arrivals[-1][0] - start))
    ordered = sorted(gaps)
    p50 = ordered[len(ordered) // 2]
    return {
        "ttft_ms": [round(t, 2) for t in ttfts],
        "itl_p50_ms": round(p50, 3),
        "itl_p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 3),
        "itl_max_ms": round(ordered[-1], 3),
        "stalls": [(round(ms, 1), pos) for ms, pos in stalls if ms > 3 * p50][:40],
        "tok_s_per_stream": [round(r) for r in rates],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_checkpoint_args(p, directory="/tmp/nanoserve-user")
    p.add_argument("--device", default="cuda")
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--step-trace", metavar="PATH", help="the services trace every step here")
    p.add_argument("--out", help="append the results as one JSON line here")
    p.add_argument(
        "--worker-args",
        default="",
        help='extra worker flags (side by side runs), e.g. "--enforce-eager"',
    )
    args = p.parse_args()
    model = checkpoint_from_args(args)
    user_path.trace_steps_to(args.step_trace)
    services, addr, vocab, _ = user_path.start(model, args, args.device)
    rng = random.Random(0)
    requests = [
        pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[rng.randrange(vocab) for _ in range(args.prompt_tokens)]),
            stream=True,
            sampling=pb.SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True),
        )
        for _ in range(args.requests)
    ]
    try:
        connect_ms, results = asyncio.run(run(addr, requests))
    finally:
        launcher.stop_all(services)
    if args.step_trace:
        write_arrivals(args.step_trace + CLIENT_SUFFIX, results)
    summary = {"connect_ms": round(connect_ms, 2), **summarize(results)}
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"arch": args.arch, "model": model, **summary}) + "\n")


if __name__ == "__main__":
    main()
