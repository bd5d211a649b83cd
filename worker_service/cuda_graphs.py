"""CUDA graphs for decode steps: captured once per batch-size bucket, replayed with padded inputs.

A decode step of a small model is dominated by kernel-launch overhead; replaying a captured graph
removes it. Buckets are 1, 2, 4, 8, then steps of 16 up to max_num_seqs. Inputs are copied into
static buffers; padded rows write nowhere (slot -1) and their outputs are dropped.
"""

from __future__ import annotations

import torch

from models.layers.attention import AttentionMetadata
from models.qwen3 import Qwen3ForCausalLM


def batch_buckets(max_num_seqs: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += list(range(16, max_num_seqs + 16, 16))
    return sorted({min(b, max_num_seqs) for b in buckets} | {max_num_seqs})


class DecodeGraphs:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        max_num_seqs: int,
        max_num_blocks_per_seq: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model = model
        self.buckets = batch_buckets(max_num_seqs)
        self.max_num_seqs = self.buckets[-1]
        n = self.max_num_seqs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_num_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.max_seqlen_k = max_num_blocks_per_seq  # only shapes matter to the kernels
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_seqlen_q=1,
            max_seqlen_k=self.max_seqlen_k,
            is_decode=True,
            is_plain_prefill=False,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            meta = self._meta(bs)
            self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs], meta)  # warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs], meta)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, meta: AttentionMetadata, num_seqs: int) -> bool:
        return (
            meta.is_decode
            and num_seqs <= self.max_num_seqs
            and meta.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # [bs, hidden]
        bs = input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= bs)
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.slot_mapping[:bs].copy_(meta.slot_mapping)
        self.slot_mapping[bs:bucket].fill_(-1)
        self.seq_lens[:bs].copy_(meta.seq_lens)
        self.seq_lens[bs:bucket].fill_(1)
        self.block_tables[bs:bucket, 0].fill_(0)  # padded rows read one valid block
        width = meta.block_tables.shape[1]
        self.block_tables[:bs, :width].copy_(meta.block_tables)
        self.graphs[bucket].replay()
        return self.hidden[:bs]
