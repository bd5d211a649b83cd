"""CUDA graphs for decode steps: captured once per batch-size bucket, replayed with padded inputs.

A decode step of a small model is dominated by launch overhead, on the device and on the host; a
graph removes both. Buckets are 1, 2, 4, 8, then steps of 16 up to max_num_seqs. One graph covers
the whole step: gathering the tokens sampled by the previous step (``prev_tokens``), the forward,
the logits and the sampling kernel, whose tokens land in ``prev_tokens`` again for the next step.

Its inputs are views of one static device buffer (``Layout``): the host packs a step into the same
layout (padded rows write nowhere: slot -1, length 1, block 0) and one copy fills them all. A step
whose sampling needs more than the kernel (filters, logprobs, min_tokens) reads ``logits`` after
the replay and samples again outside the graph.
"""

from __future__ import annotations

import numpy as np
import torch

from models.layers.attention import AttentionMetadata
from models.qwen3 import Qwen3ForCausalLM
from worker_service.batch_inputs import HostStep, Layout, upload
from worker_service.sampler import HostSampling

# Padding for rows past the batch: write no cache slot, read one valid block, take token 0.
_PADS = {"slot_mapping": -1, "seq_lens": 1, "prev_rows": -1, "temperatures": 0.0}


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
        prev_tokens: torch.Tensor,  # [>= max_num_seqs] int64: the runner's last sampled tokens
        device: torch.device,
    ) -> None:
        self.model = model
        self.buckets = batch_buckets(max_num_seqs)
        self.max_num_seqs = n = self.buckets[-1]
        self.max_blocks = max_num_blocks_per_seq
        i64, i32 = np.dtype(np.int64), np.dtype(np.int32)
        self.layout = Layout(
            {
                "input_ids": (i64, (n,)),
                "prev_rows": (i64, (n,)),
                "positions": (i64, (n,)),
                "slot_mapping": (i64, (n,)),
                "seeds": (i64, (n,)),
                "seq_lens": (i32, (n,)),
                "temperatures": (np.dtype(np.float32), (n,)),
                "block_tables": (i32, (n, max_num_blocks_per_seq)),
            }
        )
        self.static = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=device)
        self.inputs = self.layout.device_views(self.static)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.prev_tokens = prev_tokens
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor | None] = {}  # per bucket, valid after its replay

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.inputs["slot_mapping"][:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.inputs["seq_lens"][:bs],
            block_tables=self.inputs["block_tables"][:bs],
            max_seqlen_q=1,
            max_seqlen_k=self.max_blocks,  # only shapes matter to the kernels
            is_decode=True,
            is_plain_prefill=False,
        )

    def _step(self, bs: int) -> torch.Tensor | None:
        """The captured work: gather pending tokens, forward, logits, sample into prev_tokens."""
        from kernels.sample_tokens import sample_tokens

        x = self.inputs
        prev = x["prev_rows"][:bs]
        ids = torch.where(prev >= 0, self.prev_tokens[prev.clamp(min=0)], x["input_ids"][:bs])
        hidden = self.model(ids, x["positions"][:bs], self._meta(bs))
        logits = self.model.compute_logits(hidden)  # None on ranks other than 0
        if logits is not None:
            tokens = sample_tokens(logits, x["temperatures"][:bs], x["seeds"][:bs])
            self.prev_tokens[:bs].copy_(tokens)
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        self.inputs["slot_mapping"].fill_(-1)
        self.inputs["prev_rows"].fill_(-1)
        self.inputs["seq_lens"].fill_(1)
        pool = None
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            self._step(bs)  # warm-up: Triton compiles and autotunes outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._step(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, step: HostStep, num_seqs: int) -> bool:
        return (
            step.is_decode
            and num_seqs <= self.max_num_seqs
            and step.arrays["block_tables"].shape[1] <= self.max_blocks
        )

    def run(
        self, step: HostStep, sampling: HostSampling
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay for ``step`` (every row samples); returns its tokens [bs] and logits (rank 0).
        ``sampling``'s device temperatures and seeds become the graph's, for a second draw."""
        bs = len(step.arrays["input_ids"])
        bucket = next(b for b in self.buckets if b >= bs)
        buf = np.zeros(self.layout.nbytes, dtype=np.uint8)
        host = self.layout.host_views(buf)
        values = dict(step.arrays, temperatures=sampling.temperatures, seeds=sampling.seeds)
        for name, view in host.items():
            if name == "block_tables":
                tables = values[name]
                view[:bs, : tables.shape[1]] = tables
                continue
            view[:bs] = values[name]
            if name in _PADS:
                view[bs:bucket] = _PADS[name]
        upload(buf, self.static.device, out=self.static)
        sampling.temperatures_dev = self.inputs["temperatures"][:bs]
        sampling.seeds_dev = self.inputs["seeds"][:bs]
        self.graphs[bucket].replay()
        logits = self.logits[bucket]
        return self.prev_tokens[:bs], None if logits is None else logits[:bs]
