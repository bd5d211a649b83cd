"""Throughput on a shared workload: nanoserve in-process and through gRPC as users run it,
transformers' generate, and the time over the memory-bandwidth bound measured on the same device.

    python -m bench.throughput --arch qwen3-0.6b --engines inprocess,grpc-stream,grpc,transformers

Engines: ``inprocess`` (``LLM.generate``, after the same warm-up the scheduler service runs);
``grpc-stream`` and ``grpc`` (streaming and non-streaming clients, one per request, all at once)
against the services started by their documented commands with default flags, timed from the
first pass right after SERVING, then a second pass of the same prompts with their first token
changed (nothing shared in the prefix cache). Every engine starts on an empty compile cache, as
on a fresh machine. Engine limits (``--max-num-seqs``, ...) default to the services' own.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.bound import copy_bandwidth, decode_bytes
from bench.checkpoint import add_checkpoint_args, checkpoint_from_args
from bench.compile_watch import describe, watch_compiles
from bench.grpc_client import ENGINE_LIMITS
from nanoserve.llm import STEP_TRACE_ENV

WORKLOADS = Path(__file__).parent / "workloads"


def load_workload(name: str, limit: int | None) -> tuple[list[list[int]], list[int], dict]:
    data = json.loads((WORKLOADS / f"{name}.json").read_text())
    requests = data["requests"][:limit]
    return (
        [r["prompt_token_ids"] for r in requests],
        [r["max_tokens"] for r in requests],
        data["sampling"],
    )


def run_inprocess(model_dir: str, prompts, max_tokens, sampling, args) -> dict:
    from nanoserve import LLM, SamplingParams
    from scheduler_service.warm_up import warm_up

    limits = {
        k: v
        for k in (*ENGINE_LIMITS, "attention_backend")
        if (v := getattr(args, k, None)) is not None
    }
    llm = LLM(
        model_dir,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager,
        async_scheduling=not args.no_async,
        **limits,
    )
    params = [SamplingParams(max_tokens=m, **sampling) for m in max_tokens]
    warm_up(llm.engine)  # what the scheduler service runs before SERVING: no workload prompt
    llm.engine.timings.update(dict.fromkeys(llm.engine.timings, 0.0))
    profiler = _attach_profiler() if args.torch_profile else None
    device_before = llm.worker.runner.device_seconds
    started_at = time.time()  # the trace's warm-up steps are older: the report skips them
    with watch_compiles() as compiles:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    print(describe(compiles), flush=True)
    for trace in llm.traces:  # the worker's and the engine's, read by _report_trace
        trace.flush()
    if profiler is not None:
        print_kernel_totals(profiler)
    manager = llm.engine.scheduler.block_manager
    return {
        "seconds": seconds,
        "output_tokens": sum(len(o["token_ids"]) for o in outputs),
        "cached_fraction": manager.num_cache_hit_tokens / max(1, manager.num_cache_query_tokens),
        "prompt_tokens": sum(len(p) for p in prompts),
        "attention_backend": llm.engine.info.attention_backend,
        "num_kv_blocks": llm.engine.info.num_kv_blocks,
        "preemptions": llm.engine.scheduler.num_preemptions,
        "host_seconds": dict(llm.engine.timings),
        "device_busy_seconds": llm.worker.runner.device_seconds - device_before,
        "started_at": started_at,
        "triton_compiles": compiles,
    }


def _attach_profiler():
    """torch.profiler over the whole timed pass, device kernels only (CUDA graphs' included)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    prof = profile(activities=[ProfilerActivity.CUDA])
    prof.start()
    return prof


def print_kernel_totals(prof, rows: int = 30) -> None:
    """Each kernel's summed device time over the pass, largest first (bench.decode_profile's
    summary of one "step": the whole pass). With programmatic dependent launch a kernel starts
    while the one before it ends, so sums overlap: their total can pass the span (first kernel
    start to last kernel end)."""
    from bench.decode_profile import kernel_events, summarize

    torch.cuda.synchronize()
    prof.stop()
    kernels = kernel_events(prof)
    total = summarize(kernels, steps=1)
    print(
        f"kernels: {len(kernels)}, summed {total['kernel_us'] / 1e3:.1f} ms, "
        f"span {total['period_us'] / 1e3:.1f} ms"
    )
    for name, us, count in total["by_name"][:rows]:
        print(f"{us / 1e3:10.1f} ms {round(count):8d}  {name}")


def run_transformers(model_dir: str, prompts, max_tokens, sampling, args) -> dict:
    """transformers' generate, batched (left padding), static cache; each batch runs to its longest."""
    from bench.hf_reference import hf_model

    model = hf_model(model_dir)
    device = model.device
    order = sorted(range(len(prompts)), key=lambda i: max_tokens[i])
    batch = args.hf_batch_size
    start = time.perf_counter()
    useful = 0
    for begin in range(0, len(order), batch):
        idx = order[begin : begin + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.no_grad():
            model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(max_tokens[i] for i in idx),
                do_sample=True,
                temperature=sampling.get("temperature", 1.0),
                top_k=0,
                eos_token_id=None,
                pad_token_id=0,
            )
        useful += sum(max_tokens[i] for i in idx)
    return {"seconds": time.perf_counter() - start, "output_tokens": useful}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_checkpoint_args(parser)
    parser.add_argument("--workload", default="nano_bench_256")
    parser.add_argument("--limit", type=int, default=None, help="first N requests only")
    parser.add_argument("--engines", default="inprocess,grpc-stream,grpc")
    parser.add_argument(
        "--hf-limit", type=int, default=64, help="requests for the transformers run"
    )
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, help="default: the services' own")
    parser.add_argument("--max-num-batched-tokens", type=int, help="default: the services' own")
    parser.add_argument("--max-model-len", type=int, help="default: the model's (config.json)")
    parser.add_argument("--passes", type=int, default=2, help="grpc engines: passes timed")
    parser.add_argument(
        "--constrained-fraction",
        type=float,
        default=0.0,
        help="grpc engines: this share of requests get a JSON schema (bench/user_path.py)",
    )
    parser.add_argument(
        "--attention-backend", help="the workers' --attention-backend (default: theirs, auto)"
    )
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-async", action="store_true", help="synchronous scheduling")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (grpc engine)")
    parser.add_argument(
        "--torch-profile", action="store_true", help="in-process: each kernel's time over the pass"
    )
    parser.add_argument(
        "--step-trace", metavar="DIR", help="trace every step; print device time by batch size"
    )
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_args()
    if args.torch_profile and not torch.cuda.is_available():
        parser.error("--torch-profile needs CUDA: it sums the device's kernels")

    model_dir = checkpoint_from_args(args)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    prompts, max_tokens, sampling = load_workload(args.workload, args.limit)
    prompts = [[t % cfg["vocab_size"] for t in p] for p in prompts]  # small models: fold ids
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bandwidth = copy_bandwidth(device)
    bound = decode_bytes(cfg, [len(p) for p in prompts], max_tokens) / bandwidth
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "workload": args.workload,
        "requests": len(prompts),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "bound_seconds": bound,
        "bound_tokens_per_s": sum(max_tokens) / bound,
        "engines": {},
    }
    # Separate processes first: an in-process engine holds its GPU memory until this one exits.
    engines = sorted(args.engines.split(","), key=lambda e: not e.startswith("grpc"))
    for engine in engines:
        trace = _start_trace(args.step_trace, engine)
        fresh_compile_cache(engine)
        if engine == "inprocess":
            res = run_inprocess(model_dir, prompts, max_tokens, sampling, args)
        elif engine in ("grpc", "grpc-stream"):
            from bench.user_path import run_services

            res = run_services(model_dir, prompts, max_tokens, sampling, args, engine)
        elif engine == "transformers":
            n = args.hf_limit
            res = run_transformers(model_dir, prompts[:n], max_tokens[:n], sampling, args)
        else:
            raise SystemExit(f"unknown engine {engine!r}")
        res["tokens_per_s"] = res["output_tokens"] / res["seconds"]
        if trace is not None:
            res["steps"] = _report_trace(trace, res, cfg, bandwidth)
        results["engines"][engine] = res
        print(json.dumps({engine: res}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results)


def fresh_compile_cache(engine: str) -> None:
    """An empty Triton cache for what starts from here on (this process and spawned workers)."""
    import tempfile

    path = tempfile.mkdtemp(prefix=f"nanoserve-cache-{engine}-")
    os.environ["TRITON_CACHE_DIR"] = os.environ["NANOSERVE_COMPILE_CACHE_DIR"] = path


def _start_trace(trace_dir: str | None, engine: str) -> Path | None:
    """Workers started from here on (in this process or spawned) trace their steps to a file."""
    os.environ.pop(STEP_TRACE_ENV, None)
    if not trace_dir or engine == "transformers":
        return None
    path = Path(trace_dir) / f"steps_{engine}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    Path(f"{path}.scheduler").unlink(missing_ok=True)
    os.environ[STEP_TRACE_ENV] = str(path)
    return path


def _report_trace(path: Path, res: dict, cfg: dict, bandwidth: float) -> list[dict]:
    """The timed run's steps only: those collected after its clock started."""
    from bench.step_report import (
        print_host,
        print_prefill_steps,
        print_summary,
        read_trace,
        summarize,
        summarize_scheduler,
    )
    from protos.step_trace import SCHEDULER_PHASES

    if not path.exists():
        return []
    rows = read_trace(path, since=res["started_at"])
    groups = summarize(rows, cfg, bandwidth)
    print(f"where the device time went ({path.stem}):")
    print_summary(groups)
    print_prefill_steps(rows)
    scheduler = summarize_scheduler(read_trace(f"{path}.scheduler", since=res["started_at"]))
    print_host(scheduler, SCHEDULER_PHASES, "scheduler host ms")
    res["scheduler_steps"] = scheduler
    return groups


def print_table(results: dict) -> None:
    print(
        f"\n{results['workload']} on {results['device']}: copy {results['copy_bandwidth_GBps']:.0f} GB/s, "
        f"bound {results['bound_seconds']:.2f} s = {results['bound_tokens_per_s']:.0f} tok/s"
    )
    print(f"{'engine':<18}{'tokens':>10}{'seconds':>10}{'tok/s':>10}{'time/bound':>12}")
    bound = results["bound_seconds"]
    for name, res in results["engines"].items():
        rows = [
            (f"{name} pass {p['pass']}", p["tokens"], p["seconds"]) for p in res.get("passes", [])
        ]
        rows = rows or [(name, res["output_tokens"], res["seconds"])]
        for label, tokens, seconds in rows:
            ratio = seconds / bound if tokens and name != "transformers" else float("nan")
            print(f"{label:<18}{tokens:>10}{seconds:>10.2f}{tokens / seconds:>10.0f}{ratio:>12.2f}")


if __name__ == "__main__":
    main()
