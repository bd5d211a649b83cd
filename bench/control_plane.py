"""Control-plane benchmark: where a decode step's time goes with 256 sequences over real gRPC.

Starts one worker process (CPU unless ``--device cuda``) on the tiny model (or ``--model``),
drives it from an in-process EngineCore through GrpcWorkerClient, lets 256 requests finish
prefill, then times decode steps at batch 256, split into:
  planning     EngineCore.step up to the RPC: Scheduler.schedule, PlanBuilder.build, bookkeeping
  serialize    StepPlan -> StepRequest bytes (scheduler)
  grpc         the call minus the worker's own time: send, gRPC on both sides, receive
  worker wire  StepRequest -> StepPlan and StepResult -> StepResponse (worker)
  parse        StepResponse bytes -> StepResult (scheduler)
  compute      Worker.step (model forward + sampling), as the worker reports it
  outputs      the rest of EngineCore.step: append tokens, detokenize, stop checks
RPC = serialize + grpc + worker wire + parse. Target: planning + RPC < 1 ms per step.
For reference it also times an empty Ping round trip, back to back and after an idle wait as long
as a step's compute: the floor any gRPC call pays on this machine.

Run: ``python -m bench.control_plane`` (``make bench-cpu``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from nanoserve import launcher
from protos.sampling_params import SamplingParams
from scheduler_service.engine import EngineConfig, EngineCore
from scheduler_service.tokenizer import Tokenizer
from scheduler_service.worker_client import GrpcWorkerClient, StepTiming

COLUMNS = (
    "planning", "serialize", "grpc", "worker wire", "parse", "compute", "outputs", "total",
)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model", help="model directory (default: the tiny model, written to a tmp dir)"
    )
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=100, help="decode steps timed")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sync", action="store_true", help="no async scheduling (one step in flight)")
    p.add_argument("--device", default="cpu", help="the worker's device: cpu or cuda")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from models.tiny import write_tiny_model

            model_dir = str(write_tiny_model(Path(tmp) / "tiny"))
        blocks_per_seq = -(-(args.prompt_len + args.steps + 8) // args.block_size)
        worker_args = launcher.worker_args(model_dir, 0, args.device, extra=[
            "--num-kv-blocks", str(args.batch * blocks_per_seq + 16),
            "--block-size", str(args.block_size), "--log-level", "WARNING",
        ])  # fmt: skip
        worker = launcher.spawn("worker", "worker_service", worker_args, Path(tmp))
        try:
            worker.wait_for_port(120)
            run(args, model_dir, worker.addr)
        finally:
            worker.stop()


def run(args: argparse.Namespace, model_dir: str, addr: str) -> None:
    client = GrpcWorkerClient([addr])
    config = EngineConfig(
        max_num_seqs=args.batch,
        max_num_batched_tokens=max(8192, args.batch),
        async_scheduling=not args.sync,
    )
    engine = EngineCore(config, client, Tokenizer.from_dir(model_dir))
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 4, ignore_eos=True)
    vocab = engine.info.vocab_size
    for i in range(args.batch):  # distinct prompts: every sequence decodes on its own blocks
        prompt = [(7 + i * 31 + j * 13) % (vocab - 10) + 5 for j in range(args.prompt_len)]
        engine.add_request(f"r{i}", prompt, params)
    while len(engine.step()) < args.batch:  # prefill, then the first full decode step
        pass
    samples = time_decode_steps(engine, client, args.steps)
    floor = ping_floor(client, statistics.median(samples["compute"]) / 1e6)
    print_table(samples, floor, args, engine)


def time_decode_steps(
    engine: EngineCore, client: GrpcWorkerClient, num_steps: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for _ in range(num_steps):
        start = time.perf_counter_ns()
        outputs = engine.step()
        end = time.perf_counter_ns()
        assert len(outputs) == engine.config.max_num_seqs, "not a full decode batch"
        for name, ns in split(client.timing, start, end).items():
            samples[name].append(ns / 1e3)
    return samples


def split(t: StepTiming, start: int, end: int) -> dict[str, int]:
    return {
        "planning": t.start_ns - start - t.serialize_ns,  # submit() serialized before receive()
        "serialize": t.serialize_ns,
        "grpc": t.call_ns - t.compute_ns - t.worker_wire_ns,
        "worker wire": t.worker_wire_ns,
        "parse": t.parse_ns,
        "compute": t.compute_ns,
        "outputs": end - t.end_ns,
        "total": end - start,
    }


def ping_floor(client: GrpcWorkerClient, idle_s: float) -> tuple[float, float]:
    """Median us of an empty Ping: back to back, and after ``idle_s`` of idling."""

    def median_ping(num: int, pause_s: float) -> float:
        times = []
        for _ in range(num):
            time.sleep(pause_s)
            start = time.perf_counter_ns()
            client.ping()
            times.append((time.perf_counter_ns() - start) / 1e3)
        return statistics.median(times)

    return median_ping(200, 0.0), median_ping(30, idle_s)


def print_table(
    samples: dict[str, list[float]],
    floor: tuple[float, float],
    args: argparse.Namespace,
    engine: EngineCore,
) -> None:
    mode = "sync" if args.sync else "async"
    print(
        f"\n{args.batch} decoding sequences, {args.steps} steps ({mode} scheduling), model "
        f"{engine.info.model_name} on {engine.info.device}; us per step\n"
    )
    print(f"| {'part':<16} | {'median':>9} | {'mean':>9} | {'p90':>9} |")
    print(f"|{'-' * 18}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    rpc = [
        sum(v) for v in zip(*(samples[c] for c in ("serialize", "grpc", "worker wire", "parse")))
    ]
    rows = {
        **samples,
        "= RPC": rpc,
        "planning + RPC": [a + b for a, b in zip(samples["planning"], rpc)],
    }
    for name, values in rows.items():
        ordered = sorted(values)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        mean = statistics.mean(values)
        print(f"| {name:<16} | {statistics.median(values):>9.1f} | {mean:>9.1f} | {p90:>9.1f} |")
    target = statistics.median(rows["planning + RPC"])
    print(
        f"\nplanning + RPC: {target:.0f} us per step median ({'meets' if target < 1000 else 'misses'} the 1 ms target)"
    )
    print(
        f"empty Ping round trip: {floor[0]:.0f} us back to back, {floor[1]:.0f} us after idling as long as a step computes"
    )


if __name__ == "__main__":
    main()
