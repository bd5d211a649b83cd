"""Control-plane benchmark: where a decode step's time goes with 256 sequences over real gRPC.

Starts one CPU worker process on the tiny model (or ``--model``), drives it from an in-process
EngineCore through GrpcWorkerClient, lets 256 requests finish prefill, then times decode steps at
batch 256, split into:
  planning   Scheduler.schedule + PlanBuilder.build (EngineCore.step up to the RPC)
  serialize  StepPlan -> StepRequest bytes
  transport  send, worker-side parse/encode, receive (the call minus the worker's own compute)
  parse      StepResponse bytes -> StepResult
  compute    Worker.step on the worker (model forward + sampling), as the worker reports it
  outputs    the rest of EngineCore.step: commit, append tokens, detokenize, stop checks
RPC = serialize + transport + parse. Target: planning + RPC < 1 ms per step at batch 256.

Run: ``python -m bench.control_plane`` (``make bench-cpu``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scheduler_service.engine import EngineConfig, EngineCore
from scheduler_service.sampling_params import SamplingParams
from scheduler_service.tokenizer import Tokenizer
from scheduler_service.worker_client import GrpcWorkerClient

NUM_CPUS = os.cpu_count() or 1
WORKER_CPUS = set(range(1, NUM_CPUS)) if NUM_CPUS > 1 else {0}
SCHEDULER_CPUS = {0}
COLUMNS = ("planning", "serialize", "transport", "parse", "compute", "outputs", "total")


def start_worker(
    model_dir: str, num_kv_blocks: int, block_size: int, port_file: Path, pin_cpus: bool
):
    cmd = [
        sys.executable, "-m", "worker_service", "--model", model_dir, "--device", "cpu",
        "--num-kv-blocks", str(num_kv_blocks), "--block-size", str(block_size),
        "--port-file", str(port_file), "--log-level", "WARNING",
    ]  # fmt: skip
    # The worker gets its own core, as on a real deployment where it has its own machine/GPU:
    # otherwise its compute threads (spinning after each parallel region) steal the scheduler's.
    pin = (lambda: os.sched_setaffinity(0, WORKER_CPUS)) if pin_cpus else None
    proc = subprocess.Popen(cmd, preexec_fn=pin)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the worker did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def time_decode_steps(engine: EngineCore, client: GrpcWorkerClient, num_steps: int) -> dict:
    samples: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for _ in range(num_steps):
        start = time.perf_counter_ns()
        outputs = engine.step()
        end = time.perf_counter_ns()
        t = client.timing
        assert len(outputs) == engine.config.max_num_seqs, "not a full decode batch"
        parts = {
            "planning": t.start_ns - start,
            "serialize": t.serialize_ns,
            "transport": t.call_ns - t.compute_ns,
            "parse": t.parse_ns,
            "compute": t.compute_ns,
            "outputs": end - t.end_ns,
            "total": end - start,
        }
        for name, ns in parts.items():
            samples[name].append(ns / 1e3)
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model directory (default: the tiny model, written to a tmp dir)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=100, help="decode steps timed")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--pin-cpus", action="store_true", help="scheduler on CPU 0, worker on the rest")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from models.tiny import write_tiny_model

            model_dir = str(write_tiny_model(Path(tmp) / "tiny"))
        max_len = args.prompt_len + args.steps + 8
        blocks_per_seq = -(-max_len // args.block_size)
        if args.pin_cpus:
            os.sched_setaffinity(0, SCHEDULER_CPUS)
        num_blocks = args.batch * blocks_per_seq + 16
        proc, addr = start_worker(
            model_dir, num_blocks, args.block_size, Path(tmp) / "port", args.pin_cpus
        )
        try:
            run(args, model_dir, addr)
        finally:
            proc.terminate()
            proc.wait()


def run(args: argparse.Namespace, model_dir: str, addr: str) -> None:
    client = GrpcWorkerClient([addr])
    config = EngineConfig(max_num_seqs=args.batch, max_num_batched_tokens=max(8192, args.batch))
    engine = EngineCore(config, client, Tokenizer.from_dir(model_dir))
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 4, ignore_eos=True)
    vocab = engine.info.vocab_size
    for i in range(args.batch):  # distinct prompts: no prefix sharing, every sequence decodes
        prompt = [(7 + i * 31 + j * 13) % (vocab - 10) + 5 for j in range(args.prompt_len)]
        engine.add_request(f"r{i}", prompt, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()
    engine.step()  # the first full decode step (warm-up)
    samples = time_decode_steps(engine, client, args.steps)
    print_table(samples, args, engine)


def print_table(samples: dict[str, list[float]], args: argparse.Namespace, engine: EngineCore) -> None:
    print(
        f"\ncontrol plane, {args.batch} decoding sequences, {args.steps} steps, model "
        f"{engine.info.model_name} on {engine.info.device} (us per step)"
    )
    print(f"{'part':<12}{'median':>10}{'mean':>10}{'p90':>10}")
    for name in COLUMNS:
        values = sorted(samples[name])
        p90 = values[int(0.9 * (len(values) - 1))]
        print(f"{name:<12}{statistics.median(values):>10.1f}{statistics.mean(values):>10.1f}{p90:>10.1f}")
    rpc = [s + t + p for s, t, p in zip(samples["serialize"], samples["transport"], samples["parse"])]
    plan_rpc = [a + b for a, b in zip(samples["planning"], rpc)]
    print(f"{'RPC':<12}{statistics.median(rpc):>10.1f}{statistics.mean(rpc):>10.1f}")
    median = statistics.median(plan_rpc)
    verdict = "meets" if median < 1000 else "misses"
    print(f"planning + RPC: median {median:.1f} us per step ({verdict} the 1 ms target)")


if __name__ == "__main__":
    main()
