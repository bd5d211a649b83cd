"""``python -m worker_service --model DIR [--port P]``: one worker process (one tensor-parallel rank).

Loads the model shard and the KV cache, then serves ``nanoserve.worker.v1.Worker`` until SIGTERM or
Ctrl-C. ``--port 0`` (the default) lets the OS pick a port; the bound port is printed and, with
``--port-file``, written to that file once the worker is ready to answer.

The worker binds 127.0.0.1 unless ``--host`` says otherwise. With ``$NANOSERVE_WORKER_SECRET``
set (the launcher generates one) it answers only callers that present it; binding anything but
loopback without a secret is refused, since whoever reaches the port can drive the GPU.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import signal
import threading
from collections.abc import MutableMapping
from pathlib import Path

from protos.envargs import apply_env_defaults
from protos.step_trace import StepTrace, open_trace
from worker_service.config import WorkerConfig

log = logging.getLogger("worker_service")
WORKER_SECRET_ENV = "NANOSERVE_WORKER_SECRET"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker_service", description=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face style model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: let the OS pick")
    p.add_argument("--port-file", help="write the bound port here once ready")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--block-size", type=int, default=WorkerConfig.block_size)
    p.add_argument("--num-kv-blocks", type=int, help="fixed number of KV cache blocks")
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--kv-cache-gb", type=float, help="KV cache size (CPU default: 1 GB)")
    memory.add_argument(
        "--gpu-memory-utilization", type=float, default=WorkerConfig.gpu_memory_utilization
    )
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=WorkerConfig.max_num_batched_tokens
    )
    p.add_argument("--max-num-seqs", type=int, default=WorkerConfig.max_num_seqs)
    p.add_argument("--max-model-len", type=int, help="default: the model's context length")
    p.add_argument(
        "--attention-backend",
        default=WorkerConfig.attention_backend,
        help="auto|triton|flash-attn|torch, or per phase: prefill=flash-attn,decode=triton "
        "(auto: the faster one per phase as measured on this GPU architecture; docs/attention.md)",
    )
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument(
        "--max-prefill-graph-tokens",
        type=int,
        default=WorkerConfig.max_prefill_graph_tokens,
        help="prefill and mixed steps of up to this many tokens (at most the token budget) "
        "replay CUDA graphs; 0: they run eagerly",
    )
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1, help="tensor-parallel size")
    p.add_argument(
        "--dist-init-addr",
        "--dist-init",
        help="HOST:PORT (or tcp://HOST:PORT) of rank 0's torch.distributed rendezvous",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--profile-steps", help="START,COUNT: profile these steps (benchmarks only)")
    p.add_argument("--profile-out", help="where --profile-steps writes its JSON summary")
    p.add_argument(
        "--step-trace", metavar="PATH", help="benchmarks: rank 0 traces every step to PATH"
    )
    p.add_argument(
        "--compile-cache-dir",
        metavar="DIR",
        help="keep Triton's compiled kernels here (a volume: a restart compiles nothing)",
    )
    return apply_env_defaults(p).parse_args(argv)


def use_compile_cache(directory: str | None, environ: MutableMapping[str, str]) -> None:
    """Point Triton's kernel cache at ``directory`` (made if missing), and FlashAttention 4's
    (CuTe DSL) at its ``flash_attn`` folder; before either is imported."""
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        environ["TRITON_CACHE_DIR"] = directory
        environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] = "1"
        environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] = str(Path(directory) / "flash_attn")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        model_dir=args.model,
        device=_resolve_device(args.device),
        dtype=args.dtype,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_gb=args.kv_cache_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        max_prefill_graph_tokens=args.max_prefill_graph_tokens,
        rank=args.rank,
        world_size=args.world_size,
    )


def _resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _init_distributed(config: WorkerConfig, init_addr: str | None) -> None:
    """Join the tensor-parallel process group (NCCL on GPU, gloo on CPU) before the model loads."""
    if config.world_size == 1:
        return
    if not init_addr:
        raise SystemExit("--dist-init-addr is required when --world-size > 1")
    import torch
    import torch.distributed as dist

    init_method = init_addr if "://" in init_addr else f"tcp://{init_addr}"
    if not config.device.startswith("cuda"):
        dist.init_process_group(
            "gloo", init_method=init_method, rank=config.rank, world_size=config.world_size
        )
        return
    # Bind this rank's GPU first: NCCL otherwise puts every rank's communicator on cuda:0.
    device = torch.device("cuda", config.rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl",
        init_method=init_method,
        rank=config.rank,
        world_size=config.world_size,
        device_id=device,  # eager NCCL init, before any CUDA graph captures a collective
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _write_port_file(path: str, port: int) -> None:
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)  # atomic: a reader never sees a partial file


def serve(
    args: argparse.Namespace, config: WorkerConfig, secret: str | None, trace: StepTrace | None
) -> None:
    """Load the worker, serve it until SIGTERM or Ctrl-C."""
    from worker_service.server import start_server
    from worker_service.servicer import StepExecutor
    from worker_service.worker import Worker

    worker: StepExecutor = Worker(config, trace)
    if args.profile_steps:
        from worker_service.step_profiler import ProfiledWorker

        start, count = (int(n) for n in args.profile_steps.split(","))
        worker = ProfiledWorker(worker, start, count, args.profile_out or "step_profile.json")
    # The model, its modules and the compiled kernels live as long as the process: keep them out
    # of the garbage collector's full passes (100 ms pauses of the step loop otherwise).
    gc.freeze()
    server, port = start_server(worker, args.host, args.port, secret, trace)
    auth = "shared secret" if secret else "no secret (loopback only)"
    log.info("worker rank %d listening on %s:%d (%s)", config.rank, args.host, port, auth)
    print(f"worker_service listening on {args.host}:{port}", flush=True)
    if args.port_file:
        _write_port_file(args.port_file, port)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1.0).wait()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    use_compile_cache(args.compile_cache_dir, os.environ)
    config = config_from_args(args)
    from worker_service.attention_backends import check_backend  # imports triton: after the cache

    try:
        check_backend(config.attention_backend)
    except ValueError as e:
        raise SystemExit(f"--attention-backend: {e}") from None
    secret = os.environ.get(WORKER_SECRET_ENV) or None
    if secret is None and not _is_loopback(args.host):
        raise SystemExit(f"--host {args.host} is not loopback: set ${WORKER_SECRET_ENV} first")
    _init_distributed(config, args.dist_init_addr)
    with open_trace(args.step_trace if config.rank == 0 else None) as trace:
        serve(args, config, secret, trace)


if __name__ == "__main__":
    main()
