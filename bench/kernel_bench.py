"""GPU microbenchmark of the paged-attention Triton kernels against the device's own ceilings.

Decode attention is memory-bound: its figure is the K/V bytes read per second, next to a large
device-to-device copy on the same GPU (bytes read + written per second); each decode call is
replayed in a CUDA graph, as a decode step runs it (L2 may hold part of a small case's cache
from one replay to the next). Prefill attention is
compute-bound: its figure is TFLOP/s (causal: only the visible query-key pairs are counted).
``--sweep`` also times every launch configuration in a small grid and prints the fastest;
``--latency`` times decode attention at batch 1 the way a decode step runs it: 28 calls (one per
layer) captured in a CUDA graph, programmatic dependent launch on, us per call, by context length
and split count (the latency a single user's step pays, not bandwidth).

Not a correctness test (tests/unit/test_kernels.py is); needs CUDA.

    python bench/kernel_bench.py [--sweep] [--sweep-splits] [--latency]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from kernels.decode_splits import default_num_splits  # noqa: E402
from kernels.paged_decode_attention import DecodeConfig, paged_decode_attention  # noqa: E402
from kernels.paged_prefill_attention import (  # noqa: E402
    PrefillConfig,
    default_prefill_config,
    paged_prefill_attention,
)
from kernels.sample_tokens import sample_tokens  # noqa: E402

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B
DTYPE = torch.bfloat16


def time_ms(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph_ms(fn: Callable[[], object], rep: int = 100) -> float:
    """Milliseconds of one ``fn`` replayed in a CUDA graph, as a decode step runs it: an eager
    call's host launch (about 100 us for the attention and its combine) would set the time of
    every call shorter than that."""
    fn()  # compile outside the capture
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * num_bytes / (time_ms(lambda: dst.copy_(src)) * 1e-3)


def paged_kv(
    seq_lens: list[int], block_size: int, num_kv_heads: int = NUM_KV_HEADS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches with each sequence's blocks scattered; returns k, v, seq_lens, tables."""
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    shape = (num_blocks, block_size, num_kv_heads, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    order = torch.randperm(num_blocks, dtype=torch.int32)
    tables = torch.full((len(seq_lens), max(blocks_per_seq)), -1, dtype=torch.int32)
    offsets = [0, *itertools.accumulate(blocks_per_seq)]
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = order[offsets[b] : offsets[b] + n]
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, lens, tables.cuda()


def bench_decode(
    num_seqs: int,
    context: int | list[int],
    block_size: int,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> tuple[float, float]:
    """Returns (microseconds, K/V GB/s) for one decode call (the attention and, with splits, its
    combine, in a CUDA graph) over ``num_seqs`` contexts of ``context`` tokens each (or of the
    given lengths, in that order: the engine's steps come longest first)."""
    seq_lens = [context] * num_seqs if isinstance(context, int) else context
    k_cache, v_cache, lens, tables = paged_kv(seq_lens, block_size)
    q = torch.randn(num_seqs, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    scale = HEAD_DIM**-0.5
    out = torch.empty_like(q)
    ms = graph_ms(
        lambda: paged_decode_attention(
            q, k_cache, v_cache, lens, tables, scale, num_splits, out=out, config=config
        )
    )
    kv_bytes = 2 * sum(seq_lens) * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    return ms * 1e3, kv_bytes / (ms * 1e-3) / 1e9


def bench_prefill(
    cached_and_new: list[tuple[int, int]],
    num_q_heads: int,
    block_size: int = 256,
    config: PrefillConfig | None = None,
) -> tuple[float, float]:
    """Returns (milliseconds, TFLOP/s) for one prefill step; FLOPs count visible pairs only."""
    seq_lens = [c + n for c, n in cached_and_new]
    q_lens = [n for _, n in cached_and_new]
    k_cache, v_cache, lens, tables = paged_kv(seq_lens, block_size)
    q = torch.randn(sum(q_lens), num_q_heads, HEAD_DIM, dtype=DTYPE, device="cuda")
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device="cuda")
    args = (q, k_cache, v_cache, cu, lens, tables, max(q_lens), HEAD_DIM**-0.5)
    ms = time_ms(lambda: paged_prefill_attention(*args, config=config))
    pairs = sum(n * c + n * (n + 1) // 2 for c, n in cached_and_new)
    flops = 4 * pairs * num_q_heads * HEAD_DIM
    return ms, flops / (ms * 1e-3) / 1e12


def _budget_step() -> list[tuple[int, int]]:
    """nano_bench_256's first step: whole prompts of U(107, 1024) tokens, the last one a chunk,
    8,192 tokens in all."""
    gen = torch.Generator().manual_seed(0)
    lengths, total = [], 0
    while total < 8192:
        n = min(int(torch.randint(107, 1025, (1,), generator=gen)), 8192 - total)
        lengths.append(n)
        total += n
    return [(0, n) for n in lengths]


PREFILL_SHAPES = {
    "4 x 2048 plain": ([(0, 2048)] * 4, 16),
    "4 x 2048 plain, 32 q heads": ([(0, 2048)] * 4, 32),
    "8 x (1536 cached + 512 new)": ([(1536, 512)] * 8, 16),
    "1 x 8192 plain": ([(0, 8192)], 16),
    "budget step: 8,192 tokens of U(107, 1024)": (_budget_step(), 16),
    "mixed: 7 x 550 new, 240 x (600 + 1)": ([(0, 550)] * 7 + [(600, 1)] * 240, 16),
}


def sweep_decode(copy_gbs: float) -> None:
    """Every launch shape of a small grid over 256 x 1,024 tokens and over mixed lengths
    U(100, 2,048), longest first as the engine orders a decode step, at 256, 128 and 64
    sequences (auto split): the data behind ``DecodeConfig``'s default."""
    gen = torch.Generator().manual_seed(0)
    mixed = [(n, sorted(torch.randint(100, 2049, (n,), generator=gen).tolist(), reverse=True))
             for n in (256, 128, 64)]  # fmt: skip
    cases = [(256, [1024] * 256), *mixed]
    results = []
    for block_n, warps, stages in itertools.product([32, 64, 128], [2, 4, 8], [2, 3, 4]):
        config = DecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            shares = [bench_decode(n, lens, 256, config=config)[1] / copy_gbs for n, lens in cases]
        except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"  decode {config} failed: {type(e).__name__}")
            continue
        results.append((sum(shares[1:]), shares, config))
    print("\ndecode sweep, block_size 256, % of copy bandwidth (best on the mixed cases first):")
    print(f"  {'config':<58}{'256x1024':>10}{'256 mixed':>10}{'128 mixed':>10}{'64 mixed':>10}")
    for _, shares, config in sorted(results, key=lambda r: r[0], reverse=True)[:8]:
        print(f"  {config!s:<58}" + "".join(f"{s:>10.0%}" for s in shares))


def sweep_splits(copy_gbs: float) -> None:
    """Decode attention over mixed context lengths U(100, 2048), longest first as the engine
    orders a step, by batch size and split count: the data behind ``default_num_splits``."""
    print("\nsplit sweep, contexts U(100, 2048) longest first, block_size 256: % of copy bandwidth")
    counts = (1, 2, 3, 4, 6, 8, 12, 16)
    print(f"{'seqs':>6}{'auto':>6}" + "".join(f"{c:>6}" for c in counts))
    gen = torch.Generator().manual_seed(1)
    for num_seqs in (4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256):
        lens = sorted(torch.randint(100, 2049, (num_seqs,), generator=gen).tolist(), reverse=True)
        auto = default_num_splits(num_seqs, NUM_KV_HEADS, 4096, torch.device("cuda"))
        row = [bench_decode(num_seqs, lens, 256, c)[1] / copy_gbs for c in counts]
        print(f"{num_seqs:>6}{auto:>6}" + "".join(f"{r:>6.0%}" for r in row))


def decode_latency(layers: int = 28) -> None:
    """Batch-1 decode attention as a graphed decode step runs it: ``layers`` calls in a graph."""
    print(f"\ndecode attention, 1 sequence, us per call ({layers} calls in a CUDA graph):")
    counts = (1, 2, 4, 8, 16, 32)
    print(f"{'context':>8}" + "".join(f"{c:>8}" for c in counts))
    for context in (128, 600, 1124, 4096, 16384):
        k, v, lens, tables = paged_kv([context], 256)
        q = torch.randn(1, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        out = torch.empty_like(q)
        row = []
        for splits in counts:
            paged_decode_attention(q, k, v, lens, tables, 0.088, splits, out=out)  # compiles
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(layers):
                    paged_decode_attention(q, k, v, lens, tables, 0.088, splits, out=out)
            row.append(min(time_ms(graph.replay) for _ in range(3)) * 1e3 / layers)
        print(f"{context:>8}" + "".join(f"{us:>8.2f}" for us in row))


def sweep_prefill() -> None:
    for shape in ("4 x 2048 plain", "budget step: 8,192 tokens of U(107, 1024)"):
        cached_and_new, num_q_heads = PREFILL_SHAPES[shape]
        results = []
        configs = itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3])
        for block_m, block_n, warps, stages in configs:
            config = PrefillConfig(block_m, block_n, warps, stages)
            try:
                ms, tflops = bench_prefill(cached_and_new, num_q_heads, config=config)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"  prefill {config} failed: {type(e).__name__}")
                continue
            results.append((tflops, ms, config))
        print(f"\nprefill sweep, {shape}, 16 q heads (fastest first):")
        for tflops, ms, config in sorted(results, key=lambda r: r[0], reverse=True)[:6]:
            print(f"  {config}: {ms:7.3f} ms {tflops:6.1f} TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep launch configurations")
    parser.add_argument(
        "--sweep-splits", action="store_true", help="also sweep decode split counts by batch size"
    )
    parser.add_argument(
        "--latency", action="store_true", help="also time batch-1 decode calls in a graph"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bench needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    copy_gbs = copy_bandwidth() / 1e9
    print(f"device copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    if args.sweep:
        sweep_decode(copy_gbs)
        sweep_prefill()
    if args.sweep_splits:
        sweep_splits(copy_gbs)
    if args.latency:
        decode_latency()

    print(f"\n{'decode (H_q 16, H_kv 8, D 128, bf16)':40s} {'us':>8s} {'GB/s':>7s} {'% copy':>7s}")
    drawn = torch.randint(100, 2049, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    mixed = sorted(drawn, reverse=True)  # longest first, as the engine orders a decode step
    decode_cases: list[tuple[str, int, int | list[int], int, int | None]] = [
        ("256 seqs x 1024, block 256", 256, 1024, 256, None),
        ("256 seqs x U(100, 2048), auto split", 256, mixed, 256, None),
        ("256 seqs x U(100, 2048), 2 splits", 256, mixed, 256, 2),
        ("256 seqs x U(100, 2048), 4 splits", 256, mixed, 256, 4),
        ("64 seqs x U(100, 2048), auto split", 64, sorted(drawn[:64], reverse=True), 256, None),
        ("256 seqs x 1024, block 16", 256, 1024, 16, None),
        ("8 seqs x 8192, block 256, no split", 8, 8192, 256, 1),
        ("8 seqs x 8192, block 256, auto split", 8, 8192, 256, None),
    ]
    for name, num_seqs, context, block_size, num_splits in decode_cases:
        us, gbs = bench_decode(num_seqs, context, block_size, num_splits)
        print(f"{name:40s} {us:8.1f} {gbs:7.0f} {gbs / copy_gbs:7.0%}")

    print(f"\n{'prefill (D 128, H_kv 8, bf16, block 256)':40s} {'ms':>8s} {'TFLOP/s':>7s}")
    for name, (cached_and_new, num_q_heads) in PREFILL_SHAPES.items():
        config = default_prefill_config(num_q_heads // NUM_KV_HEADS, HEAD_DIM, torch.device("cuda"))
        ms, tflops = bench_prefill(cached_and_new, num_q_heads, config=config)
        print(f"{name:40s} {ms:8.3f} {tflops:7.1f}")

    print(f"\n{'sampling (vocab 151,936, bf16 logits)':40s} {'us':>8s} {'GB/s':>7s} {'% copy':>7s}")
    for rows in (256, 64, 1):
        for temperature in (0.6, 0.0):
            us, gbs = bench_sampling(rows, 151_936, temperature)
            name = f"{rows} rows, temperature {temperature}"
            print(f"{name:40s} {us:8.1f} {gbs:7.0f} {gbs / copy_gbs:7.0%}")


def bench_sampling(rows: int, vocab: int, temperature: float) -> tuple[float, float]:
    """``sample_tokens`` on [rows, vocab] logits: microseconds and logits read per second."""
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    temps = torch.full((rows,), temperature, device="cuda")
    seeds = torch.arange(rows, device="cuda", dtype=torch.int64)
    # Replayed as a CUDA graph, as the worker runs it: a few rows would time the host's launch.
    ms = graph_ms(lambda: sample_tokens(logits, temps, seeds), rep=200)
    return ms * 1e3, logits.numel() * logits.element_size() / (ms / 1e3) / 1e9


if __name__ == "__main__":
    main()
