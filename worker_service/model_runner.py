"""ModelRunner: the one place that turns a step plan into tensors, runs the model and samples.

Input: the scheduled sequences (worker-side state, after the plan's deltas) and how many tokens
each computes. Each sequence's new tokens are its tokens ``[num_computed, num_computed + n)``;
their cache slots follow from its block table. A sequence whose computed tokens reach its end
gets a next token sampled, which is appended to its worker-side token list.
"""

from __future__ import annotations

import torch

from models.layers.attention import AttentionMetadata
from models.qwen3 import Qwen3ForCausalLM
from scheduler_service.step_plan import StepResult
from worker_service.cuda_graphs import DecodeGraphs
from worker_service.sampler import SamplingBatch, compute_logprobs, sample
from worker_service.sequence_table import WorkerSequence


class ModelRunner:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        block_size: int,
        device: torch.device,
        eos_token_ids: tuple[int, ...],
        vocab_size: int,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.graphs = graphs
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(0)

    @torch.inference_mode()
    def execute(
        self, step_id: int, seqs: list[WorkerSequence], num_new_tokens: list[int]
    ) -> StepResult:
        input_ids, positions, meta, sample_rows = self._prepare(seqs, num_new_tokens)
        if self.graphs is not None and self.graphs.can_run(meta, len(seqs)):
            hidden = self.graphs.run(input_ids, positions, meta)  # [B, hidden]
        else:
            hidden = self.model(input_ids, positions, meta)  # [T, hidden]
        for seq, num_tokens in zip(seqs, num_new_tokens):
            seq.num_computed_tokens += num_tokens
        if not sample_rows:
            return StepResult(step_id, [], [])
        last_token_indices = meta.cu_seqlens_q[1:][sample_rows].long() - 1
        logits = self.model.compute_logits(hidden[last_token_indices])  # [B_s, V]
        sampling_seqs = [seqs[i] for i in sample_rows]
        logits = self._mask_stop_tokens(logits, sampling_seqs)
        tokens = sample(logits, self._sampling_batch(sampling_seqs), self.generator)
        token_list = tokens.tolist()
        for seq, token_id in zip(sampling_seqs, token_list):
            seq.token_ids.append(token_id)
        logprobs = self._logprobs(logits, tokens, sampling_seqs)
        return StepResult(
            step_id, [s.seq_id for s in sampling_seqs], token_list, logprobs
        )

    def _prepare(
        self, seqs: list[WorkerSequence], num_new_tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens_q = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for row, (seq, num_tokens) in enumerate(zip(seqs, num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[pos // bs] * bs + pos % bs for pos in range(start, end))
            cu_seqlens_q.append(cu_seqlens_q[-1] + num_tokens)
            seq_lens.append(end)
            if end == len(seq.token_ids):
                sample_rows.append(row)
        max_num_blocks = max(len(seq.block_table) for seq in seqs)
        tables = [
            seq.block_table + [-1] * (max_num_blocks - len(seq.block_table))
            for seq in seqs
        ]
        max_seqlen_q = max(num_new_tokens)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            cu_seqlens_q=self._tensor(cu_seqlens_q, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            block_tables=self._tensor(tables, torch.int32),
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max(seq_lens),
            is_decode=max_seqlen_q == 1,
            is_plain_prefill=all(s.num_computed_tokens == 0 for s in seqs),
        )
        ids = self._tensor(input_ids, torch.int64)
        return ids, self._tensor(positions, torch.int64), meta, sample_rows

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(
            values, dtype=dtype, pin_memory=self.device.type == "cuda"
        ).to(self.device, non_blocking=True)

    def _sampling_batch(self, seqs: list[WorkerSequence]) -> SamplingBatch:
        params = [s.params for s in seqs]
        top_ks = [p.top_k if p.top_k > 0 else self.vocab_size for p in params]
        return SamplingBatch(
            temperatures=self._tensor([p.temperature for p in params], torch.float32),
            top_ks=self._tensor(top_ks, torch.int64),
            top_ps=self._tensor([p.top_p for p in params], torch.float32),
            min_ps=self._tensor([p.min_p for p in params], torch.float32),
            seeds=[p.seed for p in params],
            output_indices=[s.num_output_tokens for s in seqs],
            all_greedy=all(p.temperature == 0 for p in params),
            needs_filter=any(
                p.top_k > 0 or p.top_p < 1 or p.min_p > 0
                for p in params
                if p.temperature > 0
            ),
        )

    def _mask_stop_tokens(
        self, logits: torch.Tensor, seqs: list[WorkerSequence]
    ) -> torch.Tensor:
        """Until min_tokens are out, EOS and stop token ids cannot be sampled."""
        rows = [
            i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens
        ]
        if not rows:
            return logits
        logits = logits.clone()
        for row in rows:
            params = seqs[row].params
            banned = set(params.stop_token_ids) | (
                set() if params.ignore_eos else set(self.eos_token_ids)
            )
            if banned:
                logits[row, sorted(banned)] = float("-inf")
        return logits

    def _logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, seqs: list[WorkerSequence]
    ) -> list[list[tuple[int, float]]] | None:
        """Per sampled row: (sampled id, logprob) first, then the top-n (id, logprob) pairs."""
        num_top = max(s.params.logprobs for s in seqs)
        if num_top == 0:
            return None
        sampled, top_ids, top_lps = compute_logprobs(logits, tokens, num_top)
        out = []
        for row, seq in enumerate(seqs):
            n = seq.params.logprobs
            pairs = [(int(tokens[row]), float(sampled[row]))]
            pairs += list(zip(top_ids[row, :n].tolist(), top_lps[row, :n].tolist()))
            out.append(pairs)
        return out
