"""The ``python -m nanoserve`` command line: serve, generate, run.

- ``serve``: start one worker per GPU (or one CPU worker) and the scheduler, print the address,
  stop everything on Ctrl-C or SIGTERM. With ``--gateway``: ``--replicas`` such replicas (each
  ``--tp`` GPUs of its own, or a CPU worker) on loopback ports and the SMG gateway in front, the
  OpenAI HTTP API on ``--gateway-port`` (nanoserve/gateway.py).
- ``generate "prompt"``: stream one completion from a running server to the terminal.
- ``run``: generate for a few fixed prompts with the offline LLM, in this process.
Without ``--model``, serve and run use the committed tiny trained model (``models/tiny_trained/``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

DEFAULT_PORT = 50051
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny_trained"
RUN_PROMPTS = (  # the default model knows Python's standard library and a little English
    "def fibonacci(n):",
    "class Stack:\n",
    "Once upon a time",
    "The capital of France is",
)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.func(args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nanoserve", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="start the workers and the scheduler")
    serve.add_argument("--model", help="model directory (default: the embedded tiny model)")
    serve.add_argument("--host", default="127.0.0.1", help="the public address to listen on")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="the public port (0: any)")
    serve.add_argument("--tp", type=int, help="tensor-parallel size (default: every GPU, or 1)")
    serve.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    serve.add_argument("--worker-arg", action="append", default=[], help="passed to each worker")
    serve.add_argument(
        "--scheduler-arg", action="append", default=[], help="passed to the scheduler"
    )
    serve.add_argument("--gateway", action="store_true", help="replicas behind the SMG gateway")
    serve.add_argument("--replicas", type=int, default=2, help="with --gateway (default: 2)")
    serve.add_argument("--gateway-port", type=int, default=8000, help="the OpenAI API's port")
    serve.add_argument("--policy", default="cache_aware", help="SMG's routing policy")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="stream a completion from a running server")
    gen.add_argument("prompt")
    gen.add_argument("--addr", default=f"localhost:{DEFAULT_PORT}")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.set_defaults(func=cmd_generate)

    run = sub.add_parser("run", help="generate for a few fixed prompts offline (in-process)")
    run.add_argument("--model", help="model directory (default: the embedded tiny model)")
    run.add_argument("--max-tokens", type=int, default=48)
    run.add_argument("--temperature", type=float, default=0.0)
    run.set_defaults(func=cmd_run)
    return p


def resolve_model(model: str | None) -> str:
    return model or str(DEFAULT_MODEL_DIR)


def cmd_serve(args: argparse.Namespace) -> None:
    from nanoserve import launcher

    model_dir = resolve_model(args.model)
    device, world_size = _devices(args.device, args.tp, args.replicas if args.gateway else 1)
    run_dir = launcher.make_run_dir()
    services: list[launcher.ServiceProcess] = []
    stop = _stop_on_signals()
    try:
        if args.gateway:
            _serve_gateway(args, model_dir, device, world_size, run_dir, services)
        else:
            addr = _start_replica(args, model_dir, device, world_size, run_dir, services)
            print(
                f"nanoserve ready on {addr}  (model {model_dir}, {world_size} {device} worker(s))"
            )
            print(f"  try: python -m nanoserve generate 'Hello' --addr {addr}   (logs: {run_dir})")
        while not stop() and (exited := launcher.first_exited(services)) is None:
            time.sleep(0.2)
        if not stop() and exited is not None:
            print(f"{exited.name} exited with {exited.proc.returncode}; stopping", file=sys.stderr)
    finally:
        launcher.stop_all(services)


def _start_replica(
    args: argparse.Namespace, model_dir: str, device: str, world_size: int, run_dir: Path,
    services: list, index: int | None = None,
) -> str:  # fmt: skip
    """Start a replica's workers and scheduler (added to ``services``); its address once SERVING.
    A replica with an ``index`` (under --gateway) listens on a loopback port chosen by the OS and
    has GPUs ``index * world_size`` onwards to itself."""
    from nanoserve import launcher

    prefix = "" if index is None else f"replica{index}-"
    gpus = _gpus_of(index, world_size) if index is not None and device == "cuda" else {}
    env = {**gpus, **launcher.secret_env()}  # the scheduler proves itself to its workers with it
    dist_addr = f"127.0.0.1:{launcher.free_port()}" if world_size > 1 else None
    workers = []
    for rank in range(world_size):
        wargs = launcher.worker_args(
            model_dir, 0, device, rank, world_size, dist_addr, args.worker_arg
        )
        workers.append(
            launcher.spawn(f"{prefix}worker{rank}", "worker_service", wargs, run_dir, env=env)
        )
        services.append(workers[-1])
    worker_addrs = ",".join(f"127.0.0.1:{w.wait_for_port(600)}" for w in workers)
    host, port = (args.host, args.port) if index is None else ("127.0.0.1", 0)
    sargs = ["--model", model_dir, "--workers", worker_addrs, "--host", host]
    sargs += ["--port", str(port), *args.scheduler_arg]
    scheduler = launcher.spawn(f"{prefix}scheduler", "scheduler_service", sargs, run_dir, env=env)
    services.append(scheduler)
    scheduler.wait_for_port(60)
    addr = f"{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{scheduler.port}"
    launcher.wait_until_serving(addr, 600)
    return addr


def _gpus_of(index: int, world_size: int) -> dict[str, str]:
    first = index * world_size
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(first, first + world_size))}


def _serve_gateway(
    args: argparse.Namespace, model_dir: str, device: str, world_size: int, run_dir: Path,
    services: list,
) -> None:  # fmt: skip
    from nanoserve.gateway import spawn_gateway, wait_until_ready

    addrs = [
        _start_replica(args, model_dir, device, world_size, run_dir, services, index)
        for index in range(args.replicas)
    ]
    try:
        gateway = spawn_gateway(
            addrs, model_dir, args.host, args.gateway_port, args.policy, run_dir
        )
    except FileNotFoundError as e:  # smg is not installed
        raise SystemExit(str(e)) from None
    services.append(gateway)
    wait_until_ready(gateway, 120)
    host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    print(f"nanoserve ready: the OpenAI API on http://{host}:{args.gateway_port}/v1  (SMG, "
          f"{args.policy}, {args.replicas} replicas of {world_size} {device} worker(s): "
          f"{', '.join(addrs)})")  # fmt: skip
    print(f"  try: curl http://{host}:{args.gateway_port}/v1/models   (logs: {run_dir})")


def _stop_on_signals():
    stopping = [False]

    def handler(signum: int, frame: object) -> None:
        stopping[0] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return lambda: stopping[0]


def _devices(device: str, tp: int | None, replicas: int = 1) -> tuple[str, int]:
    """(device, tensor-parallel size per replica): the GPUs shared evenly between the replicas by
    default (every GPU for one), else one CPU worker."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if tp is None:
        if device == "cuda":
            import torch

            tp = max(1, torch.cuda.device_count() // replicas)
        else:
            tp = 1
    return device, tp


def cmd_generate(args: argparse.Namespace) -> None:
    import grpc

    from protos.nanoserve.v1 import generation_pb2 as pb
    from protos.nanoserve.v1 import generation_pb2_grpc

    sampling = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.chat:
        chat = pb.Chat(messages=[pb.ChatMessage(role="user", content=args.prompt)])
        request = pb.GenerateRequest(chat=chat, sampling=sampling, stream=True)
    else:
        request = pb.GenerateRequest(text=args.prompt, sampling=sampling, stream=True)
    with grpc.insecure_channel(args.addr) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            for response in stub.Generate(request):
                if response.HasField("chunk"):
                    print(response.chunk.text, end="", flush=True)
                else:
                    done = response.complete
                    reason = pb.FinishReason.Name(done.finish_reason)
                    print(f"\n[{reason}, {done.usage.completion_tokens} tokens]", file=sys.stderr)
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            raise SystemExit(1) from None


def cmd_run(args: argparse.Namespace) -> None:
    from nanoserve import LLM, SamplingParams

    llm = LLM(resolve_model(args.model))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    for prompt, result in zip(RUN_PROMPTS, llm.generate(list(RUN_PROMPTS), params)):
        print(f"{prompt!r} -> {result['text']!r}")
