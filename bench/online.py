"""Online serving: Poisson arrivals at several request rates from streaming gRPC clients.

Reports time to first token (TTFT), inter-token latency (ITL) and end-to-end latency, p50 and
p99, per rate. The services run as separate processes, as in production.

    python -m bench.online --arch qwen3-0.6b --rates 4,16,64 --num-requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import grpc

from bench.checkpoint import add_checkpoint_args, checkpoint_from_args
from bench.grpc_client import CHANNEL_OPTIONS, request, start_services
from bench.throughput import load_workload
from nanoserve import launcher
from protos.nanoserve.v1 import generation_pb2_grpc as pb_grpc


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def one_request(stub, req) -> tuple[float, list[float], float]:
    sent = time.perf_counter()
    arrivals: list[float] = []
    async for reply in stub.Generate(req):
        if reply.HasField("chunk") and reply.chunk.token_ids:
            arrivals.append(time.perf_counter())
    done = time.perf_counter()
    ttft = arrivals[0] - sent if arrivals else done - sent
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return ttft, gaps, done - sent


async def run_rate(addr: str, requests: list, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GenerationStub(channel)
        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(one_request(stub, req)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    itls = [g for r in results for g in r[1]]
    e2e = [r[2] for r in results]
    return {
        "rate": rate,
        "requests": len(requests),
        "seconds": wall,
        "ttft_p50_ms": 1e3 * percentile(ttfts, 0.5),
        "ttft_p99_ms": 1e3 * percentile(ttfts, 0.99),
        "itl_p50_ms": 1e3 * percentile(itls, 0.5),
        "itl_p99_ms": 1e3 * percentile(itls, 0.99),
        "e2e_p50_s": percentile(e2e, 0.5),
        "e2e_p99_s": percentile(e2e, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_checkpoint_args(parser)
    parser.add_argument("--workload", default="nano_bench_256")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--max-output", type=int, default=256, help="cap each request's max_tokens")
    parser.add_argument("--rates", default="4,16,64", help="requests per second, comma-separated")
    parser.add_argument("--max-num-seqs", type=int, help="default: the services' own")
    parser.add_argument("--max-num-batched-tokens", type=int, help="default: the services' own")
    parser.add_argument("--max-model-len", type=int, help="default: the model's (config.json)")
    parser.add_argument("--out")
    args = parser.parse_args()

    model_dir = checkpoint_from_args(args)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = cfg["vocab_size"]
    prompts, max_tokens, sampling = load_workload(args.workload, args.num_requests)
    sampling = dict(sampling, detokenize=False)
    requests = [
        request([t % vocab for t in p], min(m, args.max_output), sampling)
        for p, m in zip(prompts, max_tokens)
    ]
    for req in requests:
        req.stream = True
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    services, addr = start_services(model_dir, args, device)
    try:
        rows = [
            asyncio.run(run_rate(addr, requests, float(rate), seed=i))
            for i, rate in enumerate(args.rates.split(","))
        ]
    finally:
        launcher.stop_all(services)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(
        f"\nonline serving, {args.num_requests} requests (max_tokens <= {args.max_output}) on {device}"
    )
    print(
        f"{'req/s':>6}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}{'e2e p50':>9}{'p99':>8}  (ms, ms, s)"
    )
    for r in rows:
        print(
            f"{r['rate']:>6.0f}{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>8.1f}{r['itl_p50_ms']:>9.1f}"
            f"{r['itl_p99_ms']:>8.1f}{r['e2e_p50_s']:>9.2f}{r['e2e_p99_s']:>8.2f}"
        )


if __name__ == "__main__":
    main()
