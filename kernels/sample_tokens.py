"""Sample one token per row from logits in a single pass: Gumbel-max with in-kernel random numbers.

``argmax(logits / T + G)`` with ``G = -log(-log(U))``, U uniform, draws exactly from
``softmax(logits / T)``; temperature 0 rows take the plain argmax. Each row's noise comes from
its own seed and the token index (counter-based random numbers, one Philox call for four
consecutive entries), so a row's token never depends on its neighbours or on how the vocabulary
is split. One program scores one chunk of one row's vocabulary and keeps its best (score, index);
a second kernel, one program per row, picks each row's winner among its chunks' (lowest index on
ties, like ``torch.argmax``) and writes it where the caller says (a graphed step: straight into
the tokens the next step reads). Splitting the vocabulary keeps the whole GPU busy at any batch
size. Both kernels launch with programmatic dependent launch (kernels/pdl.py) where it runs.

Filters (top_k, top_p, min_p) and banned tokens are the caller's (worker_service/sampling.py):
it sets their logits to -inf, which scores -inf whatever the noise (a chunk that is all -inf
loses to any finite one), so the kernel then draws exactly from the filtered softmax, with the
same noise per (seed, token id) as without filters. A row that is -inf everywhere gets token 0.

``sample_tokens_ref`` is the same draw in torch, Philox numbers included: token for token the
kernel's, up to rounding of ``log`` (a near-tie of two scores may break the other way). On a GPU
the kernel takes the hardware's fast log (``gumbel_noise``: within 3e-5 of the exact noise).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels.pdl import launch_options, wait_for_previous

CHUNK_SIZE = 4096  # vocabulary entries per program


@triton.jit
def _log(x, FAST: tl.constexpr):
    """Natural log: the hardware's approximation where FAST (``lg2.approx``: 3 ulp, or 2^-21.4
    absolute in [0.5, 2]), else the accurate one (the CPU interpreter has only this)."""
    if FAST:
        return libdevice.fast_logf(x)
    return tl.log(x)


@triton.jit
def gumbel_noise(uniform, FAST_LOG: tl.constexpr):
    """``-log(-log(u))`` for u in [0, 1). Near 1, ``-log(u)`` is about ``1 - u``, below the fast
    log's absolute error: there (``1 - u < 1/64``, exact in float32) it comes from the series
    ``v + v^2/2 + v^3/3 + v^4/4`` of ``v = 1 - u`` (relative error under v^4 / 5 < 2^-26)."""
    v = 1.0 - uniform
    series = v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * 0.25)))
    exponential = tl.where(v < 0.015625, series, -_log(uniform, FAST_LOG))
    return -_log(exponential, FAST_LOG)


@triton.jit
def _sample_chunk_kernel(
    logits_ptr,
    stride_row,
    temperatures_ptr,
    seeds_ptr,
    part_score_ptr,  # [B, num_chunks] float32
    part_index_ptr,  # [B, num_chunks] int32
    vocab_size,
    num_chunks,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    FAST_LOG: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temperature = tl.load(temperatures_ptr + row)
    seed = tl.load(seeds_ptr + row)
    greedy = temperature == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    best_score = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    for start in range(0, CHUNK, BLOCK):
        offsets = chunk * CHUNK + start + tl.arange(0, BLOCK)
        mask = offsets < vocab_size
        logit = tl.load(
            logits_ptr + row.to(tl.int64) * stride_row + offsets, mask=mask, other=float("-inf")
        )
        score = logit.to(tl.float32) * inv_t
        if not greedy:
            # One Philox call gives four numbers: entry i takes number i % 4 of counter i // 4.
            counters = (chunk * CHUNK + start) // 4 + tl.arange(0, BLOCK // 4)
            u0, u1, u2, u3 = tl.rand4x(seed, counters)
            uniform = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))
            score = score + gumbel_noise(uniform, FAST_LOG)
        better = (score > best_score) & mask
        best_score = tl.where(better, score, best_score)
        best_index = tl.where(better, offsets, best_index)
    top = tl.max(best_score, axis=0)
    # Lowest index among the maxima, like torch.argmax.
    winner = tl.min(tl.where(best_score == top, best_index, vocab_size), axis=0)
    tl.store(part_score_ptr + row * num_chunks + chunk, top)
    tl.store(part_index_ptr + row * num_chunks + chunk, winner)


@triton.jit
def _pick_kernel(
    part_score_ptr,  # [B, num_chunks] float32
    part_index_ptr,  # [B, num_chunks] int32
    out_ptr,  # [B] int64
    num_chunks,
    BLOCK_C: tl.constexpr,  # next power of two >= num_chunks
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0)
    chunks = tl.arange(0, BLOCK_C)
    mask = chunks < num_chunks
    score = tl.load(part_score_ptr + row * num_chunks + chunks, mask=mask, other=float("-inf"))
    top = tl.max(score, axis=0)
    # The first chunk holding the maximum: chunks are in token order, so its winner is the
    # lowest index among the maxima.
    first = tl.min(tl.where((score == top) & mask, chunks, BLOCK_C), axis=0)
    winner = tl.load(part_index_ptr + row * num_chunks + first)
    tl.store(out_ptr + row, winner.to(tl.int64))


def sample_tokens(
    logits: torch.Tensor,  # [B, V] float32 / bfloat16 / float16
    temperatures: torch.Tensor,  # [B] float32, 0 = greedy
    seeds: torch.Tensor,  # [B] int64, one noise stream per row
    chunk_size: int = CHUNK_SIZE,
    out: torch.Tensor | None = None,  # [B] int64, where the tokens go; fresh when None
) -> torch.Tensor:  # [B] int64: ``out``
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [B, V] with unit stride on V, got {tuple(logits.shape)}")
    num_rows, vocab_size = logits.shape
    if temperatures.shape != (num_rows,) or temperatures.dtype != torch.float32:
        raise ValueError("temperatures must be float32 of shape [B]")
    if seeds.shape != (num_rows,) or seeds.dtype != torch.int64:
        raise ValueError("seeds must be int64 of shape [B]")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size} is invalid: must be a power of two >= 16")
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    elif out.shape != (num_rows,) or out.dtype != torch.int64:
        raise ValueError(f"out must be int64 of shape [{num_rows}], got {tuple(out.shape)}")
    if num_rows == 0:
        return out
    num_chunks = triton.cdiv(vocab_size, chunk_size)
    part_score = torch.empty(num_rows, num_chunks, dtype=torch.float32, device=logits.device)
    part_index = torch.empty(num_rows, num_chunks, dtype=torch.int32, device=logits.device)
    pdl = launch_options(logits.device)
    _sample_chunk_kernel[(num_rows, num_chunks)](
        logits,
        logits.stride(0),
        temperatures,
        seeds,
        part_score,
        part_index,
        vocab_size,
        num_chunks,
        CHUNK=chunk_size,
        BLOCK=min(1024, chunk_size),
        FAST_LOG=logits.is_cuda,  # the accurate log took half the kernel's time at T > 0
        **pdl,
    )
    block_c = triton.next_power_of_2(num_chunks)
    _pick_kernel[(num_rows,)](part_score, part_index, out, num_chunks, BLOCK_C=block_c, **pdl)
    return out


_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_MASK32 = np.uint64(0xFFFFFFFF)


def philox_uniform_ref(seeds: torch.Tensor, num: int) -> torch.Tensor:
    """Triton's ``tl.rand4x(seed, counter)`` as the kernel reads it: [B] int64 seeds -> [B, num]
    float32 in [0, 1), entry i being number i % 4 of counter i // 4 (Philox4x32, 10 rounds)."""
    seed = seeds.cpu().numpy().astype(np.uint64)[:, None]
    c0 = np.broadcast_to(np.arange(-(-num // 4), dtype=np.uint64), (len(seed), -(-num // 4)))
    c1 = c2 = c3 = np.zeros_like(c0)
    k0, k1 = seed & _MASK32, seed >> np.uint64(32)
    for _ in range(10):
        prod_b, prod_a = np.uint64(_PHILOX_ROUND_B) * c2, np.uint64(_PHILOX_ROUND_A) * c0
        c0, c2 = (prod_b >> np.uint64(32)) ^ c1 ^ k0, (prod_a >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = prod_b & _MASK32, prod_a & _MASK32
        k0 = (k0 + np.uint64(_PHILOX_KEY_A)) & _MASK32
        k1 = (k1 + np.uint64(_PHILOX_KEY_B)) & _MASK32
    ints = np.stack([c0, c1, c2, c3], axis=-1).reshape(len(seed), -1)[:, :num]
    signed = ints.astype(np.uint32).view(np.int32)
    signed = np.where(signed < 0, ~signed, signed)  # Triton's uint_to_uniform_float
    scale = torch.tensor(4.6566127342e-10, dtype=torch.float32)
    return torch.from_numpy(signed).float() * scale


def sample_tokens_ref(
    logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor
) -> torch.Tensor:
    """The kernel's draw in torch: argmax(logits / T - log(-log U)), U the Philox numbers of
    (row seed, token id); the plain argmax at T = 0. [B, V], [B], [B] -> [B] int64."""
    greedy = temperatures == 0
    inv_t = 1.0 / torch.where(greedy, torch.ones_like(temperatures), temperatures)
    scores = logits.float() * inv_t[:, None]
    uniform = philox_uniform_ref(seeds, logits.shape[1]).to(logits.device)
    noisy = scores - torch.log(-torch.log(uniform))
    return torch.where(greedy, scores.argmax(dim=-1), noisy.argmax(dim=-1))
