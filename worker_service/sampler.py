"""Sampling next tokens from logits on the worker's device, for a whole batch at once.

Greedy rows take the argmax. Other rows are scaled by temperature, filtered by top_k, top_p and
min_p, and sampled by the exponential race (argmax of probs / E, E ~ Exp(1)), which draws exactly
from the filtered softmax. A row with a seed draws its noise from a generator seeded by
(seed, output index), so its tokens do not depend on what else is in the batch. On a GPU, a batch
without filters takes one Triton pass instead (kernels/sample_tokens.py: Gumbel-max, the same
distribution, per-row seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker_service.batch_inputs import to_device


@dataclass
class SamplingBatch:
    """Per-row sampling settings, already on the logits' device."""

    temperatures: torch.Tensor  # [B] float32, 0 = greedy
    top_ks: torch.Tensor  # [B] int64, vocab size = no limit
    top_ps: torch.Tensor  # [B] float32
    min_ps: torch.Tensor  # [B] float32
    seeds: list[int | None]  # per row
    output_indices: list[int]  # per row: index of the token being sampled in the output
    all_greedy: bool
    needs_filter: bool

    @classmethod
    def from_params(cls, seqs: list, vocab_size: int, device: torch.device) -> SamplingBatch:
        """Gather the settings of ``seqs`` (worker sequences about to sample) into tensors."""
        params = [s.params for s in seqs]
        top_ks = [p.top_k if p.top_k > 0 else vocab_size for p in params]

        def to(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device)

        return cls(
            temperatures=to([p.temperature for p in params], torch.float32),
            top_ks=to(top_ks, torch.int64),
            top_ps=to([p.top_p for p in params], torch.float32),
            min_ps=to([p.min_p for p in params], torch.float32),
            seeds=[p.seed for p in params],
            output_indices=[s.num_output_tokens for s in seqs],
            all_greedy=all(p.temperature == 0 for p in params),
            needs_filter=any(
                p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params if p.temperature > 0
            ),
        )


def sample(
    logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None = None
) -> torch.Tensor:  # logits [B, V] -> token ids [B] int64
    if logits.is_cuda and not batch.all_greedy and not batch.needs_filter:
        return _sample_with_kernel(logits, batch, generator)
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    temps = batch.temperatures.clamp(min=1e-5)[:, None]
    probs = (logits.float() / temps).softmax(dim=-1)
    if batch.needs_filter:
        probs = _filter(probs, batch)
    noise = _exponential_noise(probs, batch, generator)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(batch.temperatures == 0, greedy_tokens, sampled)


def _sample_with_kernel(
    logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None
) -> torch.Tensor:
    """One pass over the logits (Gumbel-max in Triton): no softmax, no noise tensor."""
    from kernels.sample_tokens import sample_tokens

    fixed = [
        -1 if seed is None else (seed * 1_000_003 + index) % 2**62
        for seed, index in zip(batch.seeds, batch.output_indices)
    ]
    fixed_seeds = to_device(fixed, torch.int64, logits.device)
    random_seeds = torch.randint(
        0, 2**62, fixed_seeds.shape, device=logits.device, generator=generator
    )
    row_seeds = torch.where(fixed_seeds >= 0, fixed_seeds, random_seeds)
    return sample_tokens(logits, batch.temperatures, row_seeds)


def _filter(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Zero the probabilities outside top_k, top_p and min_p (renormalising is not needed)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    drop = ranks >= batch.top_ks[:, None]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before >= batch.top_ps[:, None]
    drop |= sorted_probs < batch.min_ps[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def _exponential_noise(
    probs: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None
) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, seed in enumerate(batch.seeds):
        if seed is None:
            continue
        row_gen = torch.Generator(device=probs.device)
        row_gen.manual_seed((seed * 1_000_003 + batch.output_indices[row]) % 2**63)
        noise[row] = torch.empty_like(probs[row]).exponential_(generator=row_gen)
    return noise.clamp_(min=1e-20)  # a zero draw would give 0/0 on a filtered token


def compute_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the raw model distribution: sampled [B], top ids [B, k], top lp [B, k]."""
    logprobs = logits.float().log_softmax(dim=-1)
    sampled = logprobs.gather(-1, tokens[:, None])[:, 0]
    top_lp, top_ids = logprobs.topk(num_top, dim=-1)
    return sampled, top_ids, top_lp
