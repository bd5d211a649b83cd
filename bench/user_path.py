"""The speed a user gets: the services started by their documented commands with default flags,
256 streaming clients, the first pass right after SERVING and then a second pass.

``python -m worker_service --model DIR --device DEVICE`` and ``python -m scheduler_service --model
DIR --workers HOST:PORT``, nothing else; the checkpoint has the architecture's published
config.json (Qwen3-0.6B: max_position_embeddings 40,960, so max_model_len is that). No warm-up:
the first pass is what the first users after a deployment get.

Run: ``python -m bench.user_path [--arch qwen3-0.6b] [--device cuda]``. Needs a GPU to mean
anything; ``--limit`` and ``--max-tokens`` shrink the workload for a smoke run on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import grpc

from bench.checkpoint import ARCHITECTURES, write_random_checkpoint
from bench.throughput import load_workload
from nanoserve import launcher
from protos.nanoserve.v1 import generation_pb2 as pb
from protos.nanoserve.v1 import generation_pb2_grpc as pb_grpc


async def stream_one(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest) -> int:
    """Stream one request to its end; the number of tokens its chunks carried."""
    num_tokens = 0
    async for reply in stub.Generate(request):
        if reply.HasField("chunk"):
            num_tokens += len(reply.chunk.token_ids)
    return num_tokens


async def passes(addr: str, requests: list[pb.GenerateRequest], num_passes: int) -> None:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for i in range(num_passes):
            start = time.perf_counter()
            counts = await asyncio.gather(*(stream_one(stub, r) for r in requests))
            seconds = time.perf_counter() - start
            rate = sum(counts) / seconds
            print(f"pass {i + 1}: {sum(counts)} tokens in {seconds:.2f} s = {rate:.0f} tok/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="qwen3-0.6b", choices=sorted(ARCHITECTURES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--workload", default="nano_bench_256")
    p.add_argument("--limit", type=int, help="first N requests only")
    p.add_argument("--max-tokens", type=int, help="cap every request's max_tokens")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--checkpoint-dir", default="/tmp/nanoserve-user")
    args = p.parse_args()
    model = str(write_random_checkpoint(Path(args.checkpoint_dir) / args.arch, args.arch))
    prompts, max_tokens, sampling = load_workload(args.workload, args.limit)
    if args.max_tokens:
        max_tokens = [min(m, args.max_tokens) for m in max_tokens]
    requests = [
        pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompt),
            stream=True,
            sampling=pb.SamplingParams(max_tokens=m, **sampling),
        )
        for prompt, m in zip(prompts, max_tokens)
    ]
    run_dir = launcher.make_run_dir()
    start = time.perf_counter()
    worker_flags = ["--model", model, "--device", args.device]
    worker = launcher.spawn("worker", "worker_service", worker_flags, run_dir)
    services = [worker]
    try:
        port = worker.wait_for_port(600)
        scheduler_flags = ["--model", model, "--workers", f"127.0.0.1:{port}"]
        scheduler = launcher.spawn("scheduler", "scheduler_service", scheduler_flags, run_dir)
        services.append(scheduler)
        scheduler.wait_for_port(120)
        launcher.wait_until_serving(scheduler.addr, 600)
        print(f"process start to SERVING: {time.perf_counter() - start:.1f} s")
        asyncio.run(passes(scheduler.addr, requests, args.passes))
    finally:
        launcher.stop_all(services)


if __name__ == "__main__":
    main()
