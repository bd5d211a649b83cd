"""Tensor-parallel sweep through gRPC: for each TP size, greedy agreement with TP=1, throughput on a
workload, and the share of rank 0's step time spent in all-reduce (torch.profiler, a few steps).

    python -m bench.tp_sweep --arch qwen3-8b --tp 4,2,1 --out results/      # GPUs (NCCL)
    python -m bench.tp_sweep --model .tiny_model --tp 1,2 --limit 8        # CPU rehearsal (gloo)

Each TP size starts its own N worker ranks and scheduler (bench.grpc_client.start_services), sends
a few greedy prompts (temperature 0, ignore_eos), then the workload; the profiled step window is
part of the timed run, so it costs that run a little. Agreement is the common prefix of each
greedy output with TP=1's (bf16 all-reduces sum in a different order, so long outputs may drift).
``--check-ties`` then loads transformers' model on one GPU and, at every point where a TP size's
greedy output leaves TP=1's, measures the gap between the two chosen tokens' single-GPU logits
(a near tie is a gap within bf16 noise), and how far transformers' own greedy output agrees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.checkpoint import add_checkpoint_args, checkpoint_from_args, write_tokenizer
from bench.grpc_client import request, send_all, start_services
from bench.hf_reference import hf_greedy, hf_model
from bench.throughput import load_workload
from nanoserve import launcher


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


async def greedy_outputs(addr: str, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    import grpc

    from protos.nanoserve.v1 import generation_pb2_grpc as pb_grpc

    params = {"temperature": 0.0, "ignore_eos": True, "detokenize": False}
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(prompt: list[int]) -> list[int]:
            ids: list[int] = []
            async for reply in stub.Generate(request(prompt, num_tokens, params)):
                if reply.HasField("complete"):
                    ids = list(reply.complete.output_ids)
            return ids

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def run_one(model_dir: str, tp: int, args, prompts, max_tokens, sampling, greedy_prompts) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.tp = tp
    profile_path = Path(args.out) / f"profile_tp{tp}.json"
    profile_path.unlink(missing_ok=True)
    extra = ["--profile-steps", args.profile_steps, "--profile-out", str(profile_path)]
    started = time.perf_counter()
    services, addr = start_services(model_dir, args, device, extra)
    try:
        startup_s = time.perf_counter() - started
        greedy = asyncio.run(greedy_outputs(addr, greedy_prompts, args.greedy_tokens))
        bench_sampling = dict(sampling, detokenize=False)
        requests = [request(p, m, bench_sampling) for p, m in zip(prompts, max_tokens)]
        seconds, num_tokens, _ = asyncio.run(send_all(addr, requests))
    finally:
        launcher.stop_all(services)
        log_dir = services[0].log_path.parent if services and services[0].log_path else None
    profile = json.loads(profile_path.read_text()) if profile_path.exists() else None
    return {
        "tp": tp,
        "startup_s": startup_s,
        "greedy": greedy,
        "requests": len(prompts),
        "seconds": seconds,
        "output_tokens": num_tokens,
        "tokens_per_s": num_tokens / seconds,
        "profile": profile,
        "log_dir": str(log_dir),
    }


def divergence_gaps(model, prompts, reference, outputs) -> list[dict]:
    """Where each output first differs from the reference: transformers' logits there (one GPU,
    the reference's prefix as context), the gap between the two tokens chosen and the largest
    logit. A near tie is a gap that is a small fraction of the largest logit."""
    gaps: list[dict[str, Any]] = []
    for prompt, ref, out in zip(prompts, reference, outputs):
        n = common_prefix(ref, out)
        if n >= min(len(ref), len(out)):
            gaps.append({"diverges_at": None})
            continue
        with torch.no_grad():
            ids = torch.tensor([prompt + ref[:n]], device=model.device)
            logits = model(ids).logits[0, -1].float()
        top2 = logits.topk(2).values
        gaps.append(
            {
                "diverges_at": n,
                "gap": (logits[ref[n]] - logits[out[n]]).item(),
                "max_logit": logits.abs().max().item(),
                "top2_gap": (top2[0] - top2[1]).item(),
            }
        )
    return gaps


def check_ties(model_dir: str, results: dict, greedy_prompts, num_tokens: int, dtype: str) -> None:
    runs = {run["tp"]: run for run in results["runs"]}
    if 1 not in runs:
        return
    reference = runs[1]["greedy"]
    model = hf_model(
        model_dir, getattr(torch, dtype)
    )  # loaded once: an 8B checkpoint takes a while
    hf = hf_greedy(model, greedy_prompts, num_tokens)
    results["ties"] = {"transformers_vs_tp1": [common_prefix(a, b) for a, b in zip(hf, reference)]}
    print(
        f"\ntransformers' greedy vs TP=1, tokens agreeing: {results['ties']['transformers_vs_tp1']}"
    )
    for name, outputs in [("transformers", hf)] + [
        (f"tp{t}", r["greedy"]) for t, r in runs.items() if t != 1
    ]:
        gaps = divergence_gaps(model, greedy_prompts, reference, outputs)
        results["ties"][name] = gaps
        for i, g in enumerate(gaps):
            if g["diverges_at"] is None:
                print(f"{name} prompt {i}: agrees on all {num_tokens} tokens")
            else:
                print(
                    f"{name} prompt {i}: leaves TP=1 at token {g['diverges_at']}: logit gap "
                    f"{g['gap']:.4f} ({100 * g['gap'] / g['max_logit']:.2f}% of the largest logit "
                    f"{g['max_logit']:.2f}; top-2 gap there {g['top2_gap']:.4f})"
                )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_checkpoint_args(p, arch="qwen3-8b")
    p.add_argument("--tp", default="1,2", help="TP sizes in run order")
    p.add_argument("--workload", default="nano_bench_256")
    p.add_argument("--limit", type=int, help="first N requests only")
    p.add_argument("--greedy-prompts", type=int, default=4)
    p.add_argument("--greedy-tokens", type=int, default=64)
    p.add_argument("--profile-steps", default="150,10", help="START,COUNT of rank 0's steps")
    p.add_argument("--max-num-seqs", type=int, help="default: the services' own")
    p.add_argument("--max-num-batched-tokens", type=int, help="default: the services' own")
    p.add_argument("--max-model-len", type=int, help="default: the model's (config.json)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--out", default="tp_sweep")
    p.add_argument(
        "--check-ties", action="store_true", help="measure each greedy divergence's logit gap"
    )
    p.add_argument("--worker-args", default="", help='extra worker flags, e.g. "--dtype float32"')
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    model_dir = checkpoint_from_args(args)
    if not (Path(model_dir) / "tokenizer.json").exists():  # the scheduler needs one
        write_tokenizer(Path(model_dir))
    print(f"checkpoint ready in {time.perf_counter() - started:.0f} s: {model_dir}", flush=True)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = cfg["vocab_size"]
    prompts, max_tokens, sampling = load_workload(args.workload, args.limit)
    prompts = [[t % vocab for t in prompt] for prompt in prompts]
    greedy_prompts = [
        prompt[: 32 + 48 * i] for i, prompt in enumerate(prompts[: args.greedy_prompts])
    ]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"device": device, "model": model_dir, "workload": args.workload, "runs": []}
    for tp in (int(n) for n in args.tp.split(",")):
        run = run_one(model_dir, tp, args, prompts, max_tokens, sampling, greedy_prompts)
        results["runs"].append(run)
        summary = {k: v for k, v in run.items() if k not in ("greedy", "profile")}
        print(json.dumps(summary), flush=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, args)
    if args.check_ties:
        dtype = "float32" if "float32" in args.worker_args else "bfloat16"
        check_ties(model_dir, results, greedy_prompts, args.greedy_tokens, dtype)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))


def print_table(results: dict, args) -> None:
    runs = {run["tp"]: run for run in results["runs"]}
    reference = runs.get(1, results["runs"][0])["greedy"]
    print(
        f"\n{results['workload']} ({results['runs'][0]['requests']} requests) through gRPC on "
        f"{results['device']}; greedy: {len(reference)} prompts x {args.greedy_tokens} tokens"
    )
    print(
        f"{'TP':>3}{'tokens':>9}{'seconds':>9}{'tok/s':>9}{'startup s':>11}"
        f"{'all-reduce %':>14}{'collective %':>14}  greedy prefix agreeing with TP=1 (per prompt)"
    )
    for tp, run in runs.items():
        agree = [common_prefix(a, b) for a, b in zip(run["greedy"], reference)]
        prof = run["profile"] or {}
        ar = f"{100 * prof['all_reduce_share']:.1f}" if prof else "n/a"
        coll = f"{100 * prof['collective_share']:.1f}" if prof else "n/a"
        print(
            f"{tp:>3}{run['output_tokens']:>9}{run['seconds']:>9.2f}{run['tokens_per_s']:>9.0f}"
            f"{run['startup_s']:>11.0f}{ar:>14}{coll:>14}  {agree}"
        )


if __name__ == "__main__":
    main()
