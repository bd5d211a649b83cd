"""The throughput benchmark through the full gRPC stack: worker and scheduler as separate processes,
every request sent at once by concurrent clients over one channel (non-streaming Generate).
Flags the caller does not set are left to the services' defaults."""

from __future__ import annotations

import asyncio
import time

import grpc

from nanoserve import launcher
from protos.nanoserve.v1 import generation_pb2 as pb
from protos.nanoserve.v1 import generation_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]
ENGINE_LIMITS = ("max_num_batched_tokens", "max_num_seqs", "max_model_len")  # both services' flags


def engine_flags(args) -> list[str]:
    """The engine limits a benchmark was given (none by default: the services' own defaults)."""
    flags = []
    for name in ENGINE_LIMITS:
        value = getattr(args, name, None)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def start_services(
    model_dir: str, args, device: str, worker_extra: tuple[str, ...] | list[str] = ()
) -> tuple[list[launcher.ServiceProcess], str]:
    """``args.tp`` worker ranks and a scheduler on ports the OS picks; returns them and the public
    address. ``worker_extra`` goes to rank 0 only (e.g. its --profile-steps)."""
    run_dir = launcher.make_run_dir()
    common = engine_flags(args)
    if getattr(args, "enforce_eager", False):
        common.append("--enforce-eager")
    if getattr(args, "attention_backend", None):
        common += ["--attention-backend", args.attention_backend]
    common += getattr(args, "worker_args", "").split()  # e.g. "--dtype float32"
    tp = getattr(args, "tp", 1)
    dist_addr = f"127.0.0.1:{launcher.free_port()}" if tp > 1 else None
    workers = []
    for rank in range(tp):
        extra = [*common, *(worker_extra if rank == 0 else [])]
        wargs = launcher.worker_args(model_dir, 0, device, rank, tp, dist_addr, extra=extra)
        workers.append(launcher.spawn(f"worker{rank}", "worker_service", wargs, run_dir))
    try:
        for worker in workers:
            worker.wait_for_port(600)
    except Exception:
        launcher.stop_all(workers)
        raise
    scheduler_flags = [
        "--model",
        model_dir,
        "--workers",
        ",".join(w.addr for w in workers),
        "--port",
        "0",
        *engine_flags(args),
    ]
    if getattr(args, "no_prefix_caching", False):
        scheduler_flags.append("--no-prefix-caching")
    scheduler = launcher.spawn("scheduler", "scheduler_service", scheduler_flags, run_dir)
    scheduler.wait_for_port(120)
    launcher.wait_until_serving(scheduler.addr, 600)
    return [*workers, scheduler], scheduler.addr


def request(prompt: list[int], max_tokens: int, sampling: dict) -> pb.GenerateRequest:
    params = pb.SamplingParams(max_tokens=max_tokens, **sampling)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=params, stream=False)


async def send_all(
    addr: str, requests: list[pb.GenerateRequest]
) -> tuple[float, int, float]:  # seconds, output tokens, wall-clock start
    async with grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(req: pb.GenerateRequest) -> int:
            num_tokens = 0
            async for reply in stub.Generate(req):
                if reply.HasField("complete"):
                    num_tokens = reply.complete.usage.completion_tokens
            return num_tokens

        # No warm-up here: the scheduler warms the engine up before it reports SERVING.
        started_at = time.time()
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(r) for r in requests))
        return time.perf_counter() - start, sum(counts), started_at
