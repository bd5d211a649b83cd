"""Sampling next tokens from logits, for a whole batch at once: the one place a row's draw is made.

``build_sampling_input`` gathers, once per step, what the step's sampling rows need: temperatures
(0 = greedy), row seeds, top_k / top_p / min_p, the tokens banned under min_tokens (EOS and stop
ids) and the logprob count. Its arrays travel to the device in the step's one packed copy
(worker_service/batch_inputs.py). ``sample`` then adjusts, bans, filters and draws:

- rows with penalties or a logit bias have their logits changed first (worker_service/
  logit_adjust.py; greedy rows too). Only a step that has such rows builds and uploads their
  arrays, in a copy of their own (``with_adjust``), so the others pay nothing;
- rows with a structured-output constraint have every token their grammar refuses set to -inf
  (worker_service/grammar_mask.py), after the bans;
- banned and filtered tokens only become -inf logits; filters read softmax(logits / T) (top_k,
  top_p keeping the most likely token always, min_p), so a row without filters is left untouched;
- the draw is Gumbel-max with the Triton kernel on CUDA (kernels/sample_tokens.py: Philox noise
  keyed by the row seed and the token id) and the exponential race argmax(p / E) on CPU, with E
  from a torch.Generator seeded by the row seed. Both draw exactly from the softmax of the masked
  logits.

A row's noise depends only on its row seed: ``row_seed(seed, output index)`` for a seeded request,
a draw from the runner's generator otherwise. So a row's token depends on its own logits,
temperature, filters and row seed, never on its batch-mates or on which of them need filters. The
two devices draw different noise, so CPU and CUDA tokens of the same seed differ.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import numpy as np
import torch

from worker_service.grammar_mask import GrammarMask, apply_grammar_mask
from worker_service.logit_adjust import AdjustArrays, apply_adjust
from worker_service.sequence_table import PARAMS_DTYPE, WorkerSequence

A = TypeVar("A")  # np.ndarray on the host, torch.Tensor on the device
B = TypeVar("B")
MAX_ROW_SEED = 2**62  # row seeds lie in [0, MAX_ROW_SEED)


def row_seed(seed: int, output_index: int) -> int:
    """The noise seed of a seeded request's draw of its ``output_index``-th token."""
    return (seed * 1_000_003 + output_index) % MAX_ROW_SEED


@dataclass(frozen=True)
class SamplingArrays(Generic[A]):
    """Per sampling row (B rows; K banned ids at most per row)."""

    temperatures: A  # [B] float32, 0 = greedy
    seeds: A  # [B] int64: the row seed of this step's draw
    top_ks: A  # [B] int64, vocab size = no limit
    top_ps: A  # [B] float32, 1 = no limit
    min_ps: A  # [B] float32, 0 = no limit
    banned_ids: A  # [B, K] int64: tokens a row under min_tokens may not sample, -1 = none


@dataclass(frozen=True)
class SamplingInput(Generic[A]):
    """What one step's sampling needs: its arrays (host or device) and what they add up to."""

    arrays: SamplingArrays[A]
    all_greedy: bool  # every row takes the argmax
    needs_filter: bool  # a sampled row (temperature > 0) has top_k, top_p or min_p
    needs_mask: bool  # a row is under min_tokens with something to ban
    num_top: int  # top logprobs to return (0: none)
    adjusted_rows: tuple[int, ...] = ()  # rows with a penalty or a logit bias
    # Those rows' arrays, on the device from the start: the runner uploads them before the
    # forward (``with_adjust``), since their pending tokens must be read before a graph replays.
    adjust: AdjustArrays[torch.Tensor] | None = None
    constrained_rows: tuple[int, ...] = ()  # rows with a structured-output constraint
    # Their grammar mask, on the device: the runner builds it after queueing the forward, once
    # the previous step's tokens are back (``with_grammar``).
    grammar: GrammarMask[torch.Tensor] | None = None

    @property
    def needs_more_than_the_kernel(self) -> bool:
        """The sampling kernel alone, on the raw logits, does not draw these rows right."""
        return (
            self.needs_filter
            or self.needs_mask
            or bool(self.adjusted_rows)
            or bool(self.constrained_rows)
        )

    def on(self, arrays: SamplingArrays[B]) -> SamplingInput[B]:
        """The same input with ``arrays`` (its arrays, moved to the device)."""
        return replace(self, arrays=arrays)  # type: ignore[arg-type, return-value]

    def with_grammar(self, grammar: GrammarMask[torch.Tensor]) -> SamplingInput[A]:
        """The same input with the constrained rows' mask (on the device)."""
        return replace(self, grammar=grammar)

    def with_adjust(self, adjust: AdjustArrays[torch.Tensor]) -> SamplingInput[A]:
        """The same input with the adjusted rows' arrays (on the device)."""
        return replace(self, adjust=adjust)


def build_sampling_input(
    seqs: list[WorkerSequence],
    vocab_size: int,
    eos_token_ids: tuple[int, ...],
    rng: np.random.Generator,
) -> SamplingInput[np.ndarray]:
    """The sampling input of ``seqs`` (the rows about to sample, in order); unseeded rows take
    their row seeds from ``rng``, one draw per row."""
    n = len(seqs)
    records = np.array([s.params_record for s in seqs], dtype=PARAMS_DTYPE)  # [B]
    num_outputs = np.fromiter((s.num_output_tokens for s in seqs), dtype=np.int64, count=n)
    temperatures = np.ascontiguousarray(records["temperature"])
    seeds = rng.integers(0, MAX_ROW_SEED, size=n, dtype=np.int64)
    for row in np.flatnonzero(records["has_seed"]).tolist():
        seeds[row] = row_seed(int(records["seed"][row]), int(num_outputs[row]))
    top_ks = np.where(records["top_k"] > 0, records["top_k"], vocab_size)
    top_ps = np.ascontiguousarray(records["top_p"])
    min_ps = np.ascontiguousarray(records["min_p"])
    under_min = np.flatnonzero(num_outputs < records["min_tokens"]).tolist()
    banned = {row: _banned_ids(seqs[row], eos_token_ids) for row in under_min}
    banned_ids = np.full((n, max(map(len, banned.values()), default=0)), -1, dtype=np.int64)
    for row, ids in banned.items():
        banned_ids[row, : len(ids)] = ids
    filtered = (top_ks < vocab_size) | (top_ps < 1) | (min_ps > 0)
    return SamplingInput(
        SamplingArrays(temperatures, seeds, top_ks, top_ps, min_ps, banned_ids),
        all_greedy=not temperatures.any(),
        needs_filter=bool((filtered & (temperatures > 0)).any()),
        needs_mask=banned_ids.shape[1] > 0,
        num_top=int(records["logprobs"].max()) if n else 0,
        adjusted_rows=tuple(np.flatnonzero(records["adjusts_logits"]).tolist()),
        constrained_rows=tuple(np.flatnonzero(records["constrained"]).tolist()),
    )


def _banned_ids(seq: WorkerSequence, eos_token_ids: tuple[int, ...]) -> list[int]:
    """What a sequence still under its min_tokens may not sample: EOS and its stop ids."""
    params = seq.params
    banned = set(params.stop_token_ids)
    if not params.ignore_eos:
        banned |= set(eos_token_ids)
    return sorted(banned)


def sample(
    logits: torch.Tensor, sampling: SamplingInput[torch.Tensor], kernel: bool | None = None
) -> torch.Tensor:  # logits [B, V] -> token ids [B] int64
    """Adjust, ban, filter and draw one token per row. ``kernel``: draw with the Triton kernel
    (None: on CUDA only; True runs it wherever Triton runs, on CPU through TRITON_INTERPRET)."""
    x = sampling.arrays
    if sampling.adjust is not None:
        logits = apply_adjust(logits, sampling.adjust)
    if sampling.needs_mask:
        logits = _ban(logits, x.banned_ids)
    if sampling.grammar is not None:
        logits = apply_grammar_mask(logits, sampling.grammar)
    if sampling.all_greedy:
        return logits.argmax(dim=-1)
    if sampling.needs_filter:
        logits = _filter(logits, x)
    if logits.is_cuda if kernel is None else kernel:
        return _draw_gpu(logits, x)
    return _draw_cpu(logits, x)


def _ban(logits: torch.Tensor, banned_ids: torch.Tensor) -> torch.Tensor:
    """-inf at each row's banned ids; -1 entries point past the vocabulary, at nothing."""
    num_rows, vocab_size = logits.shape
    index = torch.where(banned_ids >= 0, banned_ids, vocab_size)  # [B, K]
    hit = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
    hit.scatter_(1, index, True)  # every write is True: repeated ids are harmless
    return logits.masked_fill(hit[:, :vocab_size], float("-inf"))


def _filter(logits: torch.Tensor, x: SamplingArrays[torch.Tensor]) -> torch.Tensor:
    """-inf outside each row's top_k, top_p and min_p of softmax(logits / T). The most likely
    token always survives, and a row whose filters are all off keeps every logit."""
    probs = (logits.float() / x.temperatures.clamp(min=1e-5)[:, None]).softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V] each
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    drop = ranks >= x.top_ks[:, None]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= (mass_before >= x.top_ps[:, None]) & (x.top_ps < 1)[:, None]
    drop |= sorted_probs < x.min_ps[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    dropped = torch.empty_like(drop).scatter_(1, order, drop)  # back to vocabulary order
    return logits.masked_fill(dropped, float("-inf"))


def _draw_gpu(logits: torch.Tensor, x: SamplingArrays[torch.Tensor]) -> torch.Tensor:
    """Gumbel-max in one Triton pass: no softmax, no noise tensor, no per-row work on the host."""
    from kernels.sample_tokens import sample_tokens

    return sample_tokens(logits, x.temperatures, x.seeds)


def _draw_cpu(logits: torch.Tensor, x: SamplingArrays[torch.Tensor]) -> torch.Tensor:
    """The exponential race argmax(p / E), E ~ Exp(1) from a generator per row seeded by its row
    seed; temperature 0 rows take the argmax."""
    temperatures = x.temperatures
    probs = (logits.float() / temperatures.clamp(min=1e-5)[:, None]).softmax(dim=-1)
    noise = torch.empty_like(probs)
    for row, seed in enumerate(x.seeds.tolist()):
        generator = torch.Generator(device=probs.device).manual_seed(seed)
        noise[row].exponential_(generator=generator)
    sampled = (probs / noise.clamp_(min=1e-20)).argmax(dim=-1)  # a zero draw: no 0/0
    return torch.where(temperatures == 0, logits.argmax(dim=-1), sampled)


def compute_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the raw model distribution (before bans and filters): sampled [B],
    top ids [B, k], top logprobs [B, k]."""
    logprobs = logits.float().log_softmax(dim=-1)
    sampled = logprobs.gather(-1, tokens[:, None])[:, 0]
    top_lp, top_ids = logprobs.topk(num_top, dim=-1)
    return sampled, top_ids, top_lp


def logprob_lists(
    seqs: list[WorkerSequence],
    token_ids: list[int],
    sampled: torch.Tensor,
    top_ids: torch.Tensor,
    top_lps: torch.Tensor,
) -> list[list[tuple[int, float]]]:
    """Per sampled row: (sampled id, logprob) first, then the top-n (id, logprob) pairs."""
    out = []
    sampled_list, ids_list, lps_list = sampled.tolist(), top_ids.tolist(), top_lps.tolist()
    for row, seq in enumerate(seqs):
        n = seq.params.logprobs
        pairs = [(token_ids[row], sampled_list[row])]
        pairs += list(zip(ids_list[row][:n], lps_list[row][:n]))
        out.append(pairs)
    return out
