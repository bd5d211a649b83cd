"""Decode steps in CUDA graphs: one token per row, a bucket per batch size.

worker_service/cuda_graphs.py says what a graph step is and holds what the kinds share."""

from __future__ import annotations

import numpy as np
import torch

from models.layers.attention import AttentionMetadata
from models.qwen3 import Qwen3ForCausalLM
from worker_service.batch_inputs import HostStep, StepArrays
from worker_service.cuda_graphs import StepGraphs, batch_buckets, put, put_tables, put_tokens


class DecodeGraphs(StepGraphs):
    """One token per row; a bucket is a batch size. The sampled tokens land in ``prev_tokens``
    itself, where the next step gathers them."""

    kind = "decode"

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        max_num_seqs: int,
        max_num_blocks_per_seq: int,
        prev_tokens: torch.Tensor,
        device: torch.device,
    ) -> None:
        buckets = batch_buckets(max_num_seqs)
        n = buckets[-1]
        super().__init__(model, buckets, n, n, max_num_blocks_per_seq, prev_tokens, device)
        self.max_num_seqs = n
        rows = np.arange(n + 1)  # a decode row's one token: the same every step
        for slot in self._host_slots:
            slot.inputs.cu_seqlens_q[:] = rows
            slot.inputs.last_token_indices[:] = rows[:-1]

    def bucket(self, step: HostStep) -> int | None:
        num_seqs = len(step.arrays.seq_lens)
        if not step.is_decode or len(step.sample_rows) != num_seqs:
            return None  # every row of a decode graph samples
        return next((b for b in self.buckets if b >= num_seqs), None)

    def meta(self, bucket: int) -> AttentionMetadata:
        x = self.inputs_gpu
        return AttentionMetadata(
            slot_mapping=x.slot_mapping[:bucket],
            cu_seqlens_q=x.cu_seqlens_q[: bucket + 1],
            seq_lens=x.seq_lens[:bucket],
            block_tables=x.block_tables[:bucket],
            max_seqlen_q=1,
            max_seqlen_k=self.max_blocks,  # only shapes matter to the kernels
            is_decode=True,
            is_plain_prefill=False,
        )

    def num_rows(self, bucket: int) -> int:
        return bucket

    def sampling_hidden(self, hidden: torch.Tensor, bucket: int) -> torch.Tensor:
        return hidden

    def tokens_out(self, bucket: int) -> torch.Tensor:
        return self.prev_tokens

    def prepare_capture(self) -> None:
        super().prepare_capture()
        self.inputs_gpu.cu_seqlens_q.copy_(torch.arange(self.max_num_seqs + 1, dtype=torch.int32))

    def fill(self, host: StepArrays[np.ndarray], step: StepArrays[np.ndarray]) -> None:
        """Padded rows: length 1 (cu_seqlens_q and last_token_indices never change: one token
        per row, set when the slot is made)."""
        put_tokens(host, step)
        put(host.seq_lens, step.seq_lens, 1)
        put_tables(host, step)
