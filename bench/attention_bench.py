"""Attention backends side by side on one GPU: Triton vs flash-attn 4, decode and prefill.

Each case runs through the backends' own ``forward`` (worker_service/attention_backends.py), as
the engine calls it, on Qwen3-0.6B's heads (H_q 16, H_kv 8, D 128, bf16) and the default block
size (256). Decode is timed inside a CUDA graph (as the engine replays it) and reported with the
K/V bytes read per second as a share of the device's copy bandwidth; prefill is timed eagerly
(as the engine runs it) and reported as a share of the dense bf16 peak (causal: visible pairs
only). Needs CUDA and the flash-attn-4 package.

    python -m bench.attention_bench [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import torch
import triton.testing

from bench.kernel_bench import HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, copy_bandwidth, paged_kv
from models.layers.attention import AttentionMetadata
from worker_service.attention_backends import TritonBackend
from worker_service.flash_attn_backend import FlashAttnBackend

BLOCK_SIZE = 256
MAX_MODEL_LEN, MAX_NUM_SEQS = 40960, 256  # the Triton decode splits by the engine's limits
PEAK_BF16_TFLOPS = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0}  # dense, no sparsity
DECODE_SEQS, DECODE_CONTEXTS = (1, 16, 64, 256), (1024, 4096, 16384)
PREFILL_CASES = {  # name: [(cached, new)] per sequence
    "1 x 1k plain": [(0, 1024)],
    "1 x 8k plain": [(0, 8192)],
    "1 x 16k plain": [(0, 16384)],
    "4 x (2k cached + 2k new)": [(2048, 2048)] * 4,
}


def metadata(cached_and_new: list[tuple[int, int]], lens, tables) -> AttentionMetadata:
    q_lens = [n for _, n in cached_and_new]
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device="cuda")
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64, device="cuda"),
        cu_seqlens_q=cu,
        seq_lens=lens,
        block_tables=tables,
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(c + n for c, n in cached_and_new),
        is_decode=all(n == 1 for n in q_lens),
        is_plain_prefill=all(c == 0 for c, _ in cached_and_new),
    )


def case(cached_and_new: list[tuple[int, int]]):
    k_cache, v_cache, lens, tables = paged_kv([c + n for c, n in cached_and_new], BLOCK_SIZE)
    num_tokens = sum(n for _, n in cached_and_new)
    q = torch.randn(num_tokens, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return q, k_cache, v_cache, metadata(cached_and_new, lens, tables)


def time_us(backend, inputs, graph: bool) -> float:
    """Median microseconds of one ``forward`` (in a CUDA graph if ``graph``)."""
    q, k_cache, v_cache, meta = inputs

    def call():
        return backend.forward(q, q, q, k_cache, v_cache, meta, HEAD_DIM**-0.5)

    call()  # compile outside the timing (and outside the graph)
    if graph:
        return 1e3 * triton.testing.do_bench_cudagraph(call, rep=100)
    return 1e3 * triton.testing.do_bench(call, rep=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth() / 1e9
    peak = PEAK_BF16_TFLOPS.get(name)
    backends = {
        "triton": TritonBackend(MAX_MODEL_LEN, MAX_NUM_SEQS),
        "flash-attn": FlashAttnBackend(),
    }
    print(f"{name}: copy {copy_gbs:.0f} GB/s, dense bf16 peak {peak} TFLOP/s")
    rows = []
    print(f"\n{'decode':28s}" + "".join(f"{b:>22s}" for b in backends))
    for num_seqs, context in itertools.product(DECODE_SEQS, DECODE_CONTEXTS):
        inputs = case([(context - 1, 1)] * num_seqs)
        kv_bytes = 2 * num_seqs * context * NUM_KV_HEADS * HEAD_DIM * 2
        row: dict[str, Any] = {"phase": "decode", "case": f"{num_seqs} seqs x {context}"}
        for b, backend in backends.items():
            us = time_us(backend, inputs, graph=True)
            row[b] = {"us": us, "share": kv_bytes / (us * 1e-6) / 1e9 / copy_gbs}
        rows.append(row)
        print(f"{row['case']:28s}" + "".join(_cell(row[b]) for b in backends))
        del inputs
    print(f"\n{'prefill':28s}" + "".join(f"{b:>22s}" for b in backends))
    for label, cached_and_new in PREFILL_CASES.items():
        inputs = case(cached_and_new)
        pairs = sum(n * c + n * (n + 1) // 2 for c, n in cached_and_new)
        tflop = 4 * pairs * NUM_Q_HEADS * HEAD_DIM / 1e12
        row = {"phase": "prefill", "case": label}
        for b, backend in backends.items():
            us = time_us(backend, inputs, graph=False)
            row[b] = {"us": us, "share": tflop / (us * 1e-6) / peak if peak else None}
        rows.append(row)
        print(f"{label:28s}" + "".join(_cell(row[b]) for b in backends))
        del inputs
    if args.out:
        info = {"device": name, "copy_gbs": copy_gbs, "peak_bf16_tflops": peak}
        with open(args.out, "w") as f:
            json.dump(info | {"rows": rows}, f, indent=1)


def _cell(result: dict) -> str:
    share = f"{result['share']:.0%}" if result["share"] is not None else "-"
    return f"{result['us']:>12.1f} us {share:>6s}"


if __name__ == "__main__":
    main()
