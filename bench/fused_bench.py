"""GPU microbenchmark of the fused elementwise Triton kernels against their torch references.

Each case is timed inside a CUDA graph (``triton.testing.do_bench_cudagraph``), as the decode step
runs, so the torch references are charged for their kernels, not for Python launch overhead. The
figure of merit is bytes read + written per second next to a large device-to-device copy; small
cases fit in L2 and may beat it. ``exact`` is the share of output elements bit-identical to the
reference. The last line estimates the time saved per Qwen3-0.6B decode step at batch 256.

Not a correctness test (tests/unit/test_fused_kernels.py is); needs CUDA.

    python bench/fused_bench.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref  # noqa: E402
from kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref  # noqa: E402
from models.layers.rotary import RotaryEmbedding  # noqa: E402

DTYPE = torch.bfloat16
EPS = 1e-6
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE = 16, 8, 128, 3072  # Qwen3-0.6B
NUM_LAYERS = 28
DECODE_BATCH = 256


class Case(NamedTuple):
    name: str
    num_tokens: int
    num_bytes: int  # read + written by one call
    fused: Callable[[], object]
    ref: Callable[[], object]
    exact: float  # share of outputs bit-identical to the reference


def time_us(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * num_bytes / (ms * 1e-3)


def share_equal(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out == ref).float().mean().item()


def rms_norm_case(num_tokens: int, hidden: int) -> Case:
    x, residual = torch.randn(2, num_tokens, hidden, device="cuda", dtype=DTYPE)
    weight = (1 + 0.2 * torch.randn(hidden, device="cuda")).to(DTYPE)
    exact = share_equal(
        rms_norm(x, weight, EPS, residual)[0], rms_norm_ref(x, weight, EPS, residual)[0]
    )
    return Case(
        f"add+rms_norm H={hidden}",
        num_tokens,
        (4 * num_tokens + 1) * hidden * DTYPE.itemsize,
        lambda: rms_norm(x, weight, EPS, residual),
        lambda: rms_norm_ref(x, weight, EPS, residual),
        exact,
    )


def qk_norm_rope_case(num_tokens: int) -> Case:
    q_size, kv_size = NUM_Q_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device="cuda", dtype=DTYPE)
    q = qkv[:, :q_size].view(num_tokens, NUM_Q_HEADS, HEAD_DIM)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    rope = RotaryEmbedding(HEAD_DIM, 40960, 1e6).to("cuda")
    positions = torch.randint(0, 40960, (num_tokens,), device="cuda")
    weight = (1 + 0.2 * torch.randn(HEAD_DIM, device="cuda")).to(DTYPE)
    args = (weight, weight, rope.cos_cache, rope.sin_cache, EPS)
    ref_q, _ = qk_norm_rope_ref(positions, q, k, *args)
    exact = share_equal(qk_norm_rope(positions, q.clone(), k.clone(), *args)[0], ref_q)
    io_bytes = 2 * (q_size + kv_size) * DTYPE.itemsize + 2 * HEAD_DIM * 4  # q, k twice; cos, sin
    return Case(
        "qk_norm_rope 16q/8kv x 128",
        num_tokens,
        num_tokens * io_bytes,
        lambda: qk_norm_rope(positions, q, k, *args),
        lambda: qk_norm_rope_ref(positions, q, k, *args),
        exact,
    )


def silu_and_mul_case(num_tokens: int) -> Case:
    x = torch.randn(num_tokens, 2 * INTERMEDIATE, device="cuda", dtype=DTYPE)
    return Case(
        f"silu_and_mul I={INTERMEDIATE}",
        num_tokens,
        3 * num_tokens * INTERMEDIATE * DTYPE.itemsize,
        lambda: silu_and_mul(x),
        lambda: silu_and_mul_ref(x),
        share_equal(silu_and_mul(x), silu_and_mul_ref(x)),
    )


def main() -> None:
    copy_gbps = copy_bandwidth() / 1e9
    print(f"{torch.cuda.get_device_name()}: device copy {copy_gbps:.0f} GB/s, {DTYPE}, CUDA graphs")
    print(
        f"{'kernel':<28}{'T':>6}{'fused us':>10}{'torch us':>10}{'speedup':>9}{'GB/s':>7}{'exact':>7}"
    )
    saved_per_layer_us = 0.0
    for num_tokens in (DECODE_BATCH, 8192):
        cases = [
            rms_norm_case(num_tokens, 1024),
            rms_norm_case(num_tokens, 4096),
            qk_norm_rope_case(num_tokens),
            silu_and_mul_case(num_tokens),
        ]
        for case in cases:
            fused_us, ref_us = time_us(case.fused), time_us(case.ref)
            gbps = case.num_bytes / (fused_us * 1e-6) / 1e9
            print(
                f"{case.name:<28}{num_tokens:>6}{fused_us:>10.1f}{ref_us:>10.1f}"
                f"{ref_us / fused_us:>8.1f}x{gbps:>7.0f}{case.exact:>7.1%}"
            )
            if num_tokens == DECODE_BATCH and "H=4096" not in case.name:
                uses = 2 if case.name.startswith("add+rms_norm") else 1  # two norms per layer
                saved_per_layer_us += uses * (ref_us - fused_us)
    saved_ms = NUM_LAYERS * saved_per_layer_us / 1e3
    print(f"estimated saving per Qwen3-0.6B decode step at T={DECODE_BATCH}: {saved_ms:.2f} ms")


if __name__ == "__main__":
    main()
