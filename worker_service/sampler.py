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

import numpy as np
import torch

from worker_service.batch_inputs import pack


@dataclass
class SamplingBatch:
    """Per-row sampling settings, already on the logits' device."""

    temperatures: torch.Tensor  # [B] float32, 0 = greedy
    top_ks: torch.Tensor | None  # [B] int64, vocab size = no limit (None: needs_filter is off)
    top_ps: torch.Tensor | None  # [B] float32
    min_ps: torch.Tensor | None  # [B] float32
    seeds: list[int | None]  # per row
    output_indices: list[int]  # per row: index of the token being sampled in the output
    all_greedy: bool
    needs_filter: bool
    # [B] int64: the sampling kernel's noise seed per row (None: the torch path, even on a GPU)
    row_seeds: torch.Tensor | None = None

    @classmethod
    def from_host(cls, seqs: list, host: HostSampling, vocab_size: int) -> SamplingBatch:
        """Tensors for ``seqs`` (worker sequences about to sample); ``host`` holds their
        temperatures and kernel seeds, already on ``device``."""
        assert host.temperatures_dev is not None, "upload the host sampling first"
        params = [s.params for s in seqs]
        top_ks = top_ps = min_ps = None
        if host.needs_filter:  # only the torch path reads the filters
            x = pack(
                {
                    "top_ks": np.array([p.top_k if p.top_k > 0 else vocab_size for p in params]),
                    "top_ps": np.array([p.top_p for p in params], dtype=np.float32),
                    "min_ps": np.array([p.min_p for p in params], dtype=np.float32),
                },
                host.temperatures_dev.device,
            )
            top_ks, top_ps, min_ps = x["top_ks"], x["top_ps"], x["min_ps"]
        return cls(
            temperatures=host.temperatures_dev,
            top_ks=top_ks,
            top_ps=top_ps,
            min_ps=min_ps,
            seeds=[p.seed for p in params],
            output_indices=[s.num_output_tokens for s in seqs],
            all_greedy=host.all_greedy,
            needs_filter=host.needs_filter,
            row_seeds=host.seeds_dev,
        )


@dataclass
class HostSampling:
    """What sampling needs from the host for one step, gathered in one pass over its rows."""

    temperatures: np.ndarray  # [B] float32
    seeds: np.ndarray  # [B] int64: the row's own (seed, output index) stream, or a random one
    all_greedy: bool
    needs_filter: bool  # top_k / top_p / min_p on a sampled row: the torch path
    masked_rows: list[int]  # rows still under min_tokens: stop tokens are banned
    num_top: int  # top logprobs to return (0: none)
    temperatures_dev: torch.Tensor | None = None  # the same two, once on the device
    seeds_dev: torch.Tensor | None = None

    @classmethod
    def of(cls, seqs: list, rng: np.random.Generator) -> HostSampling:
        n = len(seqs)
        temperatures = np.empty(n, dtype=np.float32)
        seeds = rng.integers(0, 2**62, size=n, dtype=np.int64)
        needs_filter, masked, num_top = False, [], 0
        for row, seq in enumerate(seqs):
            p = seq.params
            temperatures[row] = p.temperature
            if p.seed is not None:
                seeds[row] = (p.seed * 1_000_003 + seq.num_output_tokens) % 2**62
            if p.temperature > 0 and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0):
                needs_filter = True
            if p.min_tokens and seq.num_output_tokens < p.min_tokens:
                masked.append(row)
            num_top = max(num_top, p.logprobs)
        all_greedy = not temperatures.any()
        return cls(temperatures, seeds, bool(all_greedy), needs_filter, masked, num_top)

    @property
    def needs_torch(self) -> bool:
        """The sampling kernel alone does not do it: filters or banned tokens."""
        return self.needs_filter or bool(self.masked_rows)


def sample(
    logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None = None
) -> torch.Tensor:  # logits [B, V] -> token ids [B] int64
    kernel = not batch.all_greedy and not batch.needs_filter and batch.row_seeds is not None
    if logits.is_cuda and kernel:
        from kernels.sample_tokens import sample_tokens  # one pass: no softmax, no noise tensor

        return sample_tokens(logits, batch.temperatures, batch.row_seeds)
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
