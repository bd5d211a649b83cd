"""Sample one token per row from logits in a single pass: Gumbel-max with in-kernel random numbers.

``argmax(logits / T + G)`` with ``G = -log(-log(U))``, U uniform, draws exactly from
``softmax(logits / T)``; temperature 0 rows take the plain argmax. Each row's noise comes from
its own seed (counter-based random numbers), so a row's token never depends on its neighbours.
Filters (top_k, top_p, min_p) need a sort and stay in the torch sampler.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sample_tokens_kernel(
    logits_ptr,
    stride_row,
    temperatures_ptr,
    seeds_ptr,
    out_ptr,
    vocab_size,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    temperature = tl.load(temperatures_ptr + row)
    seed = tl.load(seeds_ptr + row)
    greedy = temperature == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    best_score = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < vocab_size
        logit = tl.load(logits_ptr + row * stride_row + offsets, mask=mask, other=float("-inf"))
        score = logit.to(tl.float32) * inv_t
        if not greedy:
            uniform = tl.rand(seed, offsets)
            score = score - tl.log(-tl.log(uniform))
        better = (score > best_score) & mask
        best_score = tl.where(better, score, best_score)
        best_index = tl.where(better, offsets, best_index)
    top = tl.max(best_score, axis=0)
    # Lowest index among the maxima, like torch.argmax.
    winner = tl.min(tl.where(best_score == top, best_index, vocab_size), axis=0)
    tl.store(out_ptr + row, winner.to(tl.int64))


def sample_tokens(
    logits: torch.Tensor,  # [B, V] float32 / bfloat16 / float16
    temperatures: torch.Tensor,  # [B] float32, 0 = greedy
    seeds: torch.Tensor,  # [B] int64, one noise stream per row
) -> torch.Tensor:  # [B] int64
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [B, V] with unit stride on V, got {tuple(logits.shape)}")
    num_rows = logits.shape[0]
    if temperatures.shape != (num_rows,) or temperatures.dtype != torch.float32:
        raise ValueError("temperatures must be float32 of shape [B]")
    if seeds.shape != (num_rows,) or seeds.dtype != torch.int64:
        raise ValueError("seeds must be int64 of shape [B]")
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        _sample_tokens_kernel[(num_rows,)](
            logits, logits.stride(0), temperatures, seeds, out, logits.shape[1], BLOCK=1024
        )
    return out


def sample_tokens_ref(
    logits: torch.Tensor, temperatures: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The distribution the kernel draws from: softmax(logits / T), argmax at T = 0."""
    probs = (logits.float() / temperatures.clamp(min=1e-5)[:, None]).softmax(-1)
    sampled = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return torch.where(temperatures == 0, logits.argmax(-1), sampled)
