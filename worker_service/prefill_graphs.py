"""Prefill, chunked and mixed steps of few tokens in CUDA graphs: a bucket per token count.

An eager step of a hundred tokens launches some 330 kernels, each costing tens of microseconds of
host time; on a small model that host time, not the device, is most of the first token's latency.
These graphs hold any step that is not a pure decode step with at most ``PREFILL_GRAPH_ROWS``
sequences and ``--max-prefill-graph-tokens`` tokens (512 by default) (a new prompt alone, or beside a few decoding
sequences). The layout always has that many rows: padded sequences have no query tokens (their
``cu_seqlens_q`` entries repeat the step's total), so the prefill attention grid, sized by the
bucket and the rows, skips them; padded tokens belong to no sequence and store nowhere. The
sampled tokens land in the graphs' own buffer (rows past the step's sampling rows are padding);
the runner copies the step's rows into ``prev_tokens``, leaving the rest as they were (a step
that samples nothing must not overwrite the tokens a later step still gathers).
"""

from __future__ import annotations

import numpy as np
import torch

from models.layers.attention import AttentionMetadata
from models.qwen3 import Qwen3ForCausalLM
from worker_service.batch_inputs import HostStep, StepArrays
from worker_service.cuda_graphs import StepGraphs, put, put_tables, put_tokens

PREFILL_GRAPH_ROWS = 16


def token_buckets(max_tokens: int) -> list[int]:
    """The token-count buckets up to ``max_tokens``: the powers of two from 16, then itself."""
    buckets = [16]
    while buckets[-1] * 2 < max_tokens:
        buckets.append(buckets[-1] * 2)
    return [b for b in buckets if b < max_tokens] + [max_tokens]


class PrefillGraphs(StepGraphs):
    kind = "prefill"

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        max_num_seqs: int,
        max_tokens: int,  # the largest bucket: a step's tokens, at most
        max_num_blocks_per_seq: int,
        prev_tokens: torch.Tensor,
        device: torch.device,
    ) -> None:
        buckets = token_buckets(max_tokens)
        rows = min(PREFILL_GRAPH_ROWS, max_num_seqs)
        super().__init__(
            model, buckets, rows, buckets[-1], max_num_blocks_per_seq, prev_tokens, device
        )
        self.sampled = torch.zeros(rows, dtype=torch.int64, device=device)

    def bucket(self, step: HostStep) -> int | None:
        if step.is_decode or len(step.arrays.seq_lens) > self.rows:
            return None
        return next((b for b in self.buckets if b >= step.num_tokens), None)

    def meta(self, bucket: int) -> AttentionMetadata:
        x = self.inputs_gpu
        return AttentionMetadata(
            slot_mapping=x.slot_mapping[:bucket],
            cu_seqlens_q=x.cu_seqlens_q,
            seq_lens=x.seq_lens,
            block_tables=x.block_tables,
            max_seqlen_q=bucket,  # sizes the attention grid: any sequence of the step fits
            max_seqlen_k=self.max_blocks,  # only shapes matter to the kernels
            is_decode=False,
            is_plain_prefill=False,
        )

    def num_rows(self, bucket: int) -> int:
        return self.rows

    def sampling_hidden(self, hidden: torch.Tensor, bucket: int) -> torch.Tensor:
        return hidden[self.inputs_gpu.last_token_indices]

    def tokens_out(self, bucket: int) -> torch.Tensor:
        return self.sampled

    def prepare_capture(self) -> None:
        super().prepare_capture()
        self.inputs_gpu.cu_seqlens_q.zero_()  # no sequence has a token: attention skips all

    def fill(self, host: StepArrays[np.ndarray], step: StepArrays[np.ndarray]) -> None:
        """Padded rows: no query tokens (their cu_seqlens_q entries are the step's total),
        length 1; padded sampling rows read token 0."""
        put_tokens(host, step)
        put(host.seq_lens, step.seq_lens, 1)
        put(host.cu_seqlens_q, step.cu_seqlens_q, step.cu_seqlens_q[-1])
        put(host.last_token_indices, step.last_token_indices, 0)
        put_tables(host, step)
