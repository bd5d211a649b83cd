"""A bounded soak run: hundreds of concurrent streaming clients against real services, on CPU.

Starts a CPU worker and the scheduler (as ``nanoserve serve`` does, with a worker secret), then
keeps ``--concurrency`` streaming Generate calls in flight until ``--num-requests`` have been sent
or ``--max-duration`` seconds have passed (it stops by itself). Checks, and exits 1 if any fails:
- every request completes with exactly its ``max_tokens`` tokens (ignore_eos), its chunks add up
  to its Complete, no request is lost or answered twice; except ``--cancel-fraction`` of them,
  whose clients cancel after the first chunk (vanished clients: their blocks must come back);
- scheduler and worker memory (RSS) after warm-up grows by less than ``--max-rss-growth-mb``;
- afterwards every KV block is free and the scheduler logged no invariant violation.
Prompts share prefixes, so the prefix cache is hit; the KV cache is small, so there is preemption.

    python -m bench.soak --num-requests 3000 --concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from nanoserve import launcher
from protos.nanoserve.v1 import generation_pb2 as pb
from protos.nanoserve.v1 import generation_pb2_grpc

INVARIANT_VIOLATION = "KV cache invariant violated"
SHARED_PREFIXES = 8  # prompts start with one of these, so the prefix cache is hit


@dataclass
class Figures:
    num_requests: int = 0
    num_completed: int = 0
    num_failed: int = 0
    num_cancelled: int = 0  # by the client, on purpose
    num_generated_tokens: int = 0
    duration_s: float = 0.0
    peak_concurrency: int = 0  # client-side live streams
    peak_server_requests: int = 0  # running + waiting, from GetServerStatus
    num_preemptions: int = 0
    prefix_cache_hit_rate: float = 0.0
    rss_mb: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> warm/end/peak
    free_blocks_end: int = 0
    total_blocks: int = 0
    errors: list[str] = field(default_factory=list)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_request(
    stub: generation_pb2_grpc.GenerationStub,
    request_id: str,
    rng: random.Random,
    figures: Figures,
    cancel: bool,
) -> None:
    prefix = [100 + p for p in range(16 * (1 + rng.randrange(SHARED_PREFIXES)))]
    prompt = prefix + [rng.randrange(3, 2000) for _ in range(rng.randrange(1, 64))]
    max_tokens = rng.randrange(1, 96)
    sampling = pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.8, seed=1)
    request = pb.GenerateRequest(
        request_id=request_id, token_ids=pb.TokenIds(ids=prompt), sampling=sampling, stream=True
    )
    streamed: list[int] = []
    completes = 0
    call = stub.Generate(request, timeout=300)
    try:
        async for response in call:
            if cancel:
                call.cancel()
                figures.num_cancelled += 1
                return
            if response.request_id != request_id:
                raise AssertionError(f"{request_id}: got a response for {response.request_id}")
            if response.HasField("chunk"):
                streamed += response.chunk.token_ids
            else:
                completes += 1
                done = response.complete
                if list(done.output_ids) != streamed or len(streamed) != max_tokens:
                    raise AssertionError(f"{request_id}: {len(streamed)} of {max_tokens} tokens")
                if done.finish_reason != pb.LENGTH:
                    raise AssertionError(f"{request_id}: finish_reason {done.finish_reason}")
        if completes != 1:
            raise AssertionError(f"{request_id}: {completes} Complete messages")
        figures.num_completed += 1
        figures.num_generated_tokens += max_tokens
    except (grpc.RpcError, AssertionError) as e:
        figures.num_failed += 1
        if len(figures.errors) < 20:
            figures.errors.append(str(e)[:300])


async def drive(addr: str, args: argparse.Namespace, pids: dict[str, int]) -> Figures:
    figures = Figures()
    rng = random.Random(args.seed)
    live: set[asyncio.Task] = set()
    rss: dict[str, list[float]] = {name: [] for name in pids}
    warm_rss: dict[str, float] = {}
    warm_after = max(1, args.num_requests // 5)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(addr, options=options) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        started = time.monotonic()
        last_sample = 0.0
        while time.monotonic() - started < args.max_duration:
            while len(live) < args.concurrency and figures.num_requests < args.num_requests:
                request_id = f"soak-{figures.num_requests}"
                cancel = rng.random() < args.cancel_fraction
                task = asyncio.create_task(one_request(stub, request_id, rng, figures, cancel))
                live.add(task)
                task.add_done_callback(live.discard)
                figures.num_requests += 1
            figures.peak_concurrency = max(figures.peak_concurrency, len(live))
            if not live:
                break
            if time.monotonic() - last_sample >= 1.0:
                last_sample = time.monotonic()
                for name, pid in pids.items():
                    rss[name].append(rss_mb(pid))
                if not warm_rss and figures.num_completed >= warm_after:
                    warm_rss = {name: values[-1] for name, values in rss.items()}
                status = await stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=10)
                busy = status.num_running_requests + status.num_waiting_requests
                figures.peak_server_requests = max(figures.peak_server_requests, busy)
            await asyncio.wait(live, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
        for task in list(live):
            task.cancel()
        figures.duration_s = round(time.monotonic() - started, 1)
        await asyncio.sleep(1.0)
        status = await stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=10)
    for name, pid in pids.items():
        end = rss_mb(pid)
        figures.rss_mb[name] = {
            "warm": round(warm_rss.get(name, rss[name][0] if rss[name] else end), 1),
            "end": round(end, 1),
            "peak": round(max(rss[name] + [end]), 1),
        }
    figures.free_blocks_end = status.free_blocks
    figures.total_blocks = status.total_blocks
    figures.num_preemptions = status.num_preemptions
    figures.prefix_cache_hit_rate = round(status.prefix_cache_hit_rate, 3)
    return figures


def failures(figures: Figures, args: argparse.Namespace, scheduler_log: str) -> list[str]:
    found = []
    num_done = figures.num_completed + figures.num_cancelled
    if num_done != figures.num_requests or figures.num_failed:
        found.append(f"{num_done} of {figures.num_requests} completed or cancelled")
    if figures.free_blocks_end != figures.total_blocks:
        found.append(f"free_blocks {figures.free_blocks_end} != total {figures.total_blocks}")
    if INVARIANT_VIOLATION in scheduler_log:
        found.append("the scheduler logged a KV cache invariant violation")
    for name, rss in figures.rss_mb.items():
        if rss["end"] - rss["warm"] > args.max_rss_growth_mb:
            found.append(f"{name} RSS grew {rss['end'] - rss['warm']:.0f} MB after warm-up")
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model directory (default: the tiny model, written fresh)")
    p.add_argument("--num-requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--max-duration", type=float, default=600.0, help="seconds; stops by itself")
    p.add_argument("--num-kv-blocks", type=int, default=512, help="of 16 tokens")
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    p.add_argument("--cancel-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)

    run_dir = Path(tempfile.mkdtemp(prefix="nanoserve-soak-"))
    model = args.model
    if model is None:
        from models.tiny import write_tiny_model

        model = str(write_tiny_model(run_dir / "model"))
    env = launcher.secret_env()
    kv = ["--num-kv-blocks", str(args.num_kv_blocks), "--block-size", "16"]
    worker_args = launcher.worker_args(model, 0, "cpu", extra=kv)
    services = [launcher.spawn("worker", "worker_service", worker_args, run_dir, env=env)]
    try:
        services[0].wait_for_port(300)
        scheduler_args = ["--model", model, "--workers", services[0].addr, "--port", "0"]
        scheduler = launcher.spawn(
            "scheduler", "scheduler_service", scheduler_args, run_dir, env=env
        )
        services.append(scheduler)
        scheduler.wait_for_port(60)
        launcher.wait_until_serving(scheduler.addr, 120)
        pids = {"scheduler": scheduler.proc.pid, "worker": services[0].proc.pid}
        figures = asyncio.run(drive(scheduler.addr, args, pids))
        assert scheduler.log_path is not None
        problems = failures(figures, args, scheduler.log_path.read_text(errors="replace"))
    finally:
        launcher.stop_all(services)
    report = {"figures": asdict(figures), "problems": problems, "logs": str(run_dir)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
