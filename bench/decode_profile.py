"""Where a decode step's device time goes: each kernel of a graphed decode step, from torch.profiler.

    python -m bench.decode_profile [--arch qwen3-0.6b] [--batch 1,256] [--steps 20] [--out FILE]

Runs ``LLM.generate`` in this process (default flags, after the scheduler's warm-up) on
``--batch`` random 100-token prompts, greedy, ignore_eos, and profiles ``--steps`` decode steps in
the middle of the run. Per step it reports the device period (first kernel start to last kernel
end, divided by the steps), the kernels' summed time, the gaps between them (the period minus
that), the number of kernels, and the kernels by name (time per step, count per step); the weight
period is also given as a multiple of the weights' read time at the copy bandwidth. Then the
median engine step (host time of ``EngineCore.step``) and the generate call's time per token.
``--prefill`` profiles one request's first step instead (torch.profiler, then cProfile);
``--python`` cProfiles the host over the ``--steps`` steps after the kernel window; ``--no-skinny``
and ``--no-pdl`` turn the decode GEMM and programmatic dependent launch off, for a side-by-side
run. Needs CUDA.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import pstats
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bound import copy_bandwidth, weight_bytes
from bench.checkpoint import ARCHITECTURES, add_checkpoint_args, checkpoint_from_args

PROMPT_TOKENS = 100


@contextmanager
def hooked_steps(engine, around: Callable[[int, Callable], object]) -> Iterator[None]:
    """Inside the block, ``engine.step()`` runs as ``around(n, step)``, n counting steps from 1."""
    step = engine.step
    count = itertools.count(1)
    engine.step = lambda: around(next(count), step)
    try:
        yield
    finally:
        engine.step = step


def kernel_events(prof) -> list[tuple[str, int, int]]:
    """(name, start ns, duration ns) of every device kernel the profiler saw, in start order."""
    out = []
    for event in prof.profiler.kineto_results.events():
        if event.device_type() == torch.autograd.DeviceType.CUDA and event.duration_ns() > 0:
            name = event.name()
            if name.startswith("Memcpy") or name.startswith("Memset"):
                continue
            out.append((name, event.start_ns(), event.duration_ns()))
    return sorted(out, key=lambda e: e[1])


def summarize(kernels: list[tuple[str, int, int]], steps: int) -> dict:
    period = (kernels[-1][1] + kernels[-1][2] - kernels[0][1]) / steps / 1e3  # us
    busy = sum(d for _, _, d in kernels) / steps / 1e3
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, _, duration in kernels:
        by_name[name][0] += duration / steps / 1e3
        by_name[name][1] += 1 / steps
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    # One step's kernels in order, from just after the window's first sampling kernel: the
    # embedding, then layer by layer (each GEMM's own time, which the names do not tell apart).
    first = next((i for i, k in enumerate(kernels) if "sample" in k[0]), 0) + 1
    sequence = [
        (name[:48], round(duration / 1e3, 2), round((start - kernels[i - 1][1]) / 1e3, 2))
        for i, (name, start, duration) in enumerate(kernels[first : first + 19], first)
    ]
    return {
        "sequence": sequence,
        "period_us": period,
        "kernel_us": busy,
        "gap_us": period - busy,
        "kernels_per_step": len(kernels) / steps,
        "by_name": [(name[:90], round(us, 2), round(n, 2)) for name, (us, n) in rows],
    }


def profile_batch(
    llm, vocab: int, batch: int, steps: int, max_tokens: int, python: cProfile.Profile | None
) -> dict:
    """The kernels of ``steps`` decode steps from the middle of a run at ``batch``; with
    ``python``, the host's Python time of the next ``steps`` steps is profiled into it."""
    from nanoserve import SamplingParams

    rng = random.Random(batch)
    prompts = [[rng.randrange(vocab) for _ in range(PROMPT_TOKENS)] for _ in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    first = max_tokens // 2
    prof = profile(activities=[ProfilerActivity.CUDA])
    times: list[float] = []

    def profiled_step(n: int, step: Callable):
        if n == first:
            torch.cuda.synchronize()
            prof.start()
        start = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - start)
        if n == first + steps - 1:
            torch.cuda.synchronize()
            prof.stop()
            if python is not None:
                python.enable()
        if python is not None and n == first + 2 * steps - 1:
            python.disable()
        return out

    with hooked_steps(llm.engine, profiled_step):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    # The window opens while a step is in flight (async scheduling): its tail is counted too.
    kernels = kernel_events(prof)
    summary = summarize(kernels, steps)
    decode = sorted(times[2:])  # the first steps are the prefill
    summary["engine_step_p50_us"] = 1e6 * decode[len(decode) // 2]
    summary["wall_per_token_ms"] = 1e3 * wall / max_tokens
    return summary


def profile_prefill(llm, vocab: int, repeats: int = 3) -> None:
    """The first step of one 100-token request (its prefill), ``repeats`` times under
    torch.profiler (the step's time each; the last one's ops by host time), then once more under
    cProfile (where the host's Python time goes, Triton's launches included)."""
    from nanoserve import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    rng = random.Random(7)
    python = cProfile.Profile()
    for repeat in range(repeats + 1):  # the last run under cProfile instead
        profiler: cProfile.Profile | profile = python
        if repeat < repeats:
            profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        seconds: list[float] = []

        def first_step(n: int, step: Callable, profiler=profiler, seconds=seconds):
            if n > 1:
                return step()
            torch.cuda.synchronize()
            start = time.perf_counter()
            with profiler:
                out = step()
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            return out

        with hooked_steps(llm.engine, first_step):
            prompt = [rng.randrange(vocab) for _ in range(PROMPT_TOKENS)]
            llm.generate([prompt], params, use_tqdm=False)
        if repeat < repeats:
            print(
                f"\nprefill of {PROMPT_TOKENS} tokens, repeat {repeat}: {1e3 * seconds[0]:.2f} ms"
            )
        if repeat == repeats - 1 and isinstance(profiler, profile):
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    pstats.Stats(python).sort_stats("tottime").print_stats(22)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_checkpoint_args(p, directory="/tmp/nanoserve-user")
    p.add_argument("--batch", default="1,256")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--top", type=int, default=14, help="kernel names to print per batch")
    p.add_argument("--prefill", action="store_true", help="profile one request's prefill too")
    p.add_argument("--python", action="store_true", help="cProfile of the host, per batch")
    p.add_argument(
        "--no-skinny",
        action="store_true",
        help="cuBLAS for every GEMM (kernels/skinny_gemm.py off)",
    )
    p.add_argument(
        "--no-pdl", action="store_true", help="no programmatic dependent launch (kernels/pdl.py)"
    )
    p.add_argument("--out", help="append the results as JSON lines here")
    args = p.parse_args()
    from kernels import pdl, skinny_gemm_configs
    from nanoserve import LLM
    from scheduler_service.warm_up import warm_up

    if args.no_skinny:
        skinny_gemm_configs.MAX_WEIGHT_BYTES = 0
    pdl.enabled = not args.no_pdl

    llm = LLM(checkpoint_from_args(args))
    warm_up(llm.engine)
    cfg = ARCHITECTURES[args.arch]
    vocab = cfg["vocab_size"]
    assert isinstance(vocab, int)
    weights = weight_bytes(cfg)
    copy = copy_bandwidth(torch.device("cuda"))
    bound_us = 1e6 * weights / copy
    print(
        f"{torch.cuda.get_device_name()} {args.arch}: weights {weights / 1e9:.2f} GB, "
        f"read at the copy rate ({copy / 1e12:.2f} TB/s) in {bound_us:.0f} us"
    )
    if args.prefill:
        profile_prefill(llm, vocab)
    for batch in (int(b) for b in args.batch.split(",") if b):
        python = cProfile.Profile() if args.python else None
        s = profile_batch(llm, vocab, batch, args.steps, args.max_tokens, python)
        print(
            f"\nbatch {batch}: device period {s['period_us']:.1f} us/step "
            f"({s['period_us'] / bound_us:.2f}x the weight bound), kernels {s['kernel_us']:.1f}, "
            f"gaps {s['gap_us']:.1f}, {s['kernels_per_step']:.0f} kernels/step; "
            f"engine step p50 {s['engine_step_p50_us']:.0f} us, "
            f"generate {s['wall_per_token_ms']:.3f} ms/token"
        )
        for name, us, n in s["by_name"][: args.top]:
            print(f"  {us:9.2f} us {n:6.1f}x  {name}")
        print("  one step in order: kernel, its us, us since the previous kernel started")
        for name, us, since in s["sequence"]:
            print(f"    {us:8.2f} {since:8.2f}  {name}")
        if python is not None:
            print(f"  host Python of {args.steps} steps:")
            pstats.Stats(python).sort_stats("tottime").print_stats(25)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"arch": args.arch, "batch": batch, **s}) + "\n")
    llm.close()


if __name__ == "__main__":
    main()
