"""The speed a user gets: the services started by their documented commands with default flags,
256 concurrent clients (streaming by default), the first pass right after SERVING and more passes.

``python -m worker_service --model DIR --device DEVICE`` and ``python -m scheduler_service --model
DIR --workers HOST:PORT``, nothing else; the checkpoint has the architecture's published
config.json (Qwen3-0.6B: max_position_embeddings 40,960, so max_model_len is that). No warm-up:
the first pass is what the first users after a deployment get. Each later pass sends the same
prompts with their first token changed, so no pass finds another's prompts in the prefix cache.

Run: ``python -m bench.user_path [--arch qwen3-0.6b] [--device cuda]``. ``--max-model-len`` (both
services) exists only to show the speed does not depend on it; ``--no-stream`` sends
non-streaming requests. ``--limit`` and ``--max-tokens`` shrink the workload for a smoke run on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from bench.checkpoint import add_checkpoint_args, checkpoint_from_args
from bench.grpc_client import start_services
from bench.throughput import load_workload
from nanoserve import launcher
from nanoserve.llm import STEP_TRACE_ENV
from protos.nanoserve.v1 import generation_pb2 as pb
from protos.nanoserve.v1 import generation_pb2_grpc as pb_grpc


async def one(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest) -> tuple[int, list[float]]:
    """Run one request to its end: its output tokens and the times its chunks arrived."""
    num_tokens, arrivals = 0, []
    async for reply in stub.Generate(request):
        if reply.HasField("chunk") and reply.chunk.token_ids:
            arrivals.append(time.perf_counter())
        if reply.HasField("complete"):
            num_tokens = reply.complete.usage.completion_tokens
    return num_tokens, arrivals


def shifted(requests: list[pb.GenerateRequest], k: int, vocab: int) -> list[pb.GenerateRequest]:
    """The same requests, each prompt's first token moved by ``k``: nothing shared in the cache."""
    out = []
    for r in requests:
        copy = pb.GenerateRequest()
        copy.CopyFrom(r)
        copy.token_ids.ids[0] = (copy.token_ids.ids[0] + k) % vocab
        out.append(copy)
    return out


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gaps(arrival_lists: Iterable[list[float]]) -> list[float]:
    """The time between consecutive arrivals, over every request's arrival times."""
    return [b - a for t in arrival_lists for a, b in zip(t, t[1:])]


def quantiles(values: list[float], n: int = 200) -> list[float]:
    """``n + 1`` evenly spaced quantiles of ``values`` (for a distribution plot), in ms."""
    ordered = sorted(values)
    if not ordered:
        return []
    return [1e3 * ordered[round(i * (len(ordered) - 1) / n)] for i in range(n + 1)]


async def passes(addr: str, requests: list[pb.GenerateRequest], num_passes: int, vocab: int):
    """Each pass sends every request at once; its tokens, time, TTFT and ITL quantiles."""
    results = []
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for i in range(num_passes):
            batch = shifted(requests, i, vocab) if i else requests
            started_at = time.time()
            start = time.perf_counter()
            done = await asyncio.gather(*(one(stub, r) for r in batch))
            seconds = time.perf_counter() - start
            tokens = sum(n for n, _ in done)
            gaps = _gaps(t for _, t in done)
            ttfts = [t[0] - start for _, t in done if t]
            is_free = [r.sampling.WhichOneof("constraint") is None for r in batch]
            free = [t for (_, t), f in zip(done, is_free) if f]
            free_done = [(n, t) for (n, t), f in zip(done, is_free) if f and n > 1 and t]
            constrained_ttfts = [t[0] - start for (_, t), f in zip(done, is_free) if t and not f]
            res: dict[str, Any] = {"pass": i + 1, "tokens": tokens, "seconds": seconds}
            res["tok_s"] = tokens / seconds
            res |= {
                "started_at": started_at,
                "ttft_ms": quantiles(ttfts),
                "itl_ms": quantiles(gaps),
                "free_itl_ms": quantiles(_gaps(free)),
                "constrained_ttft_ms": quantiles(constrained_ttfts),
                # per free request: (last token's arrival - first's) / (tokens - 1), vLLM's TPOT
                "free_tpot_ms": quantiles([(t[-1] - t[0]) / (n - 1) for n, t in free_done]),
            }
            results.append(res)
            line = {k: v for k, v in res.items() if not k.endswith("_ms")}
            if gaps:
                line["itl_p50_ms"], line["itl_p99_ms"] = res["itl_ms"][100], res["itl_ms"][198]
            print(json.dumps(line), flush=True)
    return results


SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z ]{1,40}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 8},
        },
        "required": ["name", "age", "tags"],
    }
)


def constrain(requests: list[pb.GenerateRequest], fraction: float) -> None:
    """Every ``1 / fraction``-th request gets a JSON schema (and may end early: no ignore_eos)."""
    if fraction <= 0:
        return
    step = max(1, round(1 / fraction))
    for r in requests[::step]:
        r.sampling.json_schema = SCHEMA
        r.sampling.ClearField("ignore_eos")


def trace_steps_to(path: str | None) -> None:
    """Services started from here on trace every step to ``path`` (None: they do not)."""
    os.environ.pop(STEP_TRACE_ENV, None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        os.environ[STEP_TRACE_ENV] = path


def start(
    model_dir: str, args, device: str
) -> tuple[list[launcher.ServiceProcess], str, int, float]:
    """Start the services and wait for SERVING: (services, address, vocab size, seconds it took)."""
    started = time.perf_counter()
    services, addr = start_services(model_dir, args, device)
    ready_s = time.perf_counter() - started
    print(f"process start to SERVING: {ready_s:.1f} s", flush=True)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    return services, addr, vocab, ready_s


def run_services(model_dir: str, prompts, max_tokens, sampling, args, engine: str) -> dict:
    """bench.throughput's ``grpc-stream`` / ``grpc`` engines: start, time the passes, stop."""
    device = getattr(args, "device", None) or ("cuda" if _has_cuda() else "cpu")
    services, addr, vocab, ready_s = start(model_dir, args, device)
    requests = [
        pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[t % vocab for t in prompt]),
            stream=engine == "grpc-stream",
            sampling=pb.SamplingParams(max_tokens=m, **sampling),  # text too, as users get
        )
        for prompt, m in zip(prompts, max_tokens)
    ]
    constrain(requests, getattr(args, "constrained_fraction", 0.0))
    try:
        results = asyncio.run(passes(addr, requests, args.passes, vocab))
    finally:
        launcher.stop_all(services)  # workers write their step traces as they exit
    first = results[0]
    return {
        "seconds": first["seconds"],
        "output_tokens": first["tokens"],
        "started_at": first["started_at"],
        "ready_s": ready_s,
        "passes": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_checkpoint_args(p, directory="/tmp/nanoserve-user")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workload", default="nano_bench_256")
    p.add_argument("--limit", type=int, help="first N requests only")
    p.add_argument("--max-tokens", type=int, help="cap every request's max_tokens")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--no-stream", action="store_true", help="non-streaming requests")
    p.add_argument(
        "--constrained-fraction",
        type=float,
        default=0.0,
        help="this share of the requests get a JSON schema; free_itl_ms is the others' ITL",
    )
    p.add_argument("--max-model-len", type=int, help="given to both services (default: none)")
    p.add_argument("--step-trace", metavar="PATH", help="the services trace every step here")
    p.add_argument("--out", help="append the results as one JSON line here")
    args = p.parse_args()
    model = checkpoint_from_args(args)
    prompts, max_tokens, sampling = load_workload(args.workload, args.limit)
    if args.max_tokens:
        max_tokens = [min(m, args.max_tokens) for m in max_tokens]
    trace_steps_to(args.step_trace)
    engine = "grpc" if args.no_stream else "grpc-stream"
    res = run_services(model, prompts, max_tokens, sampling, args, engine)
    if args.out:
        line = {"engine": engine, "max_model_len": args.max_model_len, **res}
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
