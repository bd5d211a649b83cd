"""Prefill, chunked and mixed steps in CUDA graphs: a bucket per token count.

An eager step launches some 330 kernels, each costing tens of microseconds of host time: on a
small model that host time, not the device, is most of a first token's latency, and a step of a
whole token budget (8,192 tokens beside the decoding sequences) waits on it as much as on its
GEMMs. Two kinds of graph hold any step that is not a pure decode step, up to
``--max-prefill-graph-tokens`` tokens (by default the token budget): ``narrow`` ones for steps of
at most ``PREFILL_GRAPH_ROWS`` sequences and ``NARROW_TOKENS`` tokens (a new prompt alone, or
beside a few decoding sequences), and ``wide`` ones, with a row for every sequence the engine
runs, for the rest (prompts beside a full batch of decodes; chunks of long prompts). The layout
always has its kind's rows: padded sequences have no query tokens (their ``cu_seqlens_q``
entries repeat the step's total), so the prefill attention, whose grid is sized by the bucket's
tokens and the rows, skips them; padded tokens belong to no sequence and store nowhere. The
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

PREFILL_GRAPH_ROWS = 16  # a narrow graph's rows
NARROW_TOKENS = 512  # a narrow graph's tokens, at most


def token_buckets(max_tokens: int) -> list[int]:
    """The narrow token-count buckets up to ``max_tokens``: the powers of two from 16, then
    itself."""
    buckets = [16]
    while buckets[-1] * 2 < max_tokens:
        buckets.append(buckets[-1] * 2)
    return [b for b in buckets if b < max_tokens] + [max_tokens]


def wide_token_buckets(max_tokens: int) -> list[int]:
    """The wide buckets up to ``max_tokens``: powers of two from 128 to 2,048, then every 1,024
    up to 4,096 and every 2,048 past it (a step pads by at most half its tokens past 1,024),
    then itself. Each bucket keeps its own logits (rows x vocabulary), so they stay few."""
    buckets = [128, 256, 512, 1024, 2048, 3072, 4096]
    while buckets[-1] + 2048 < max_tokens:
        buckets.append(buckets[-1] + 2048)
    return [b for b in buckets if b < max_tokens] + [max_tokens]


def prefill_graph_kinds(
    model: Qwen3ForCausalLM,
    max_num_seqs: int,
    max_tokens: int,  # a step's tokens, at most
    max_num_blocks_per_seq: int,
    prev_tokens: torch.Tensor,
    device: torch.device,
) -> list[PrefillGraphs]:
    """The narrow kind, then (where the engine's steps can be wider) the wide one: in the order
    the runner tries them, so a step takes the narrowest graph that holds it."""
    rows = min(PREFILL_GRAPH_ROWS, max_num_seqs)
    narrow_tokens = min(NARROW_TOKENS, max_tokens)
    args = (max_num_blocks_per_seq, prev_tokens, device)
    kinds = [PrefillGraphs(model, rows, token_buckets(narrow_tokens), *args)]
    if max_num_seqs > rows or max_tokens > narrow_tokens:
        wide = wide_token_buckets(max_tokens)
        kinds.append(PrefillGraphs(model, max_num_seqs, wide, *args, kind="wide prefill"))
    return kinds


class PrefillGraphs(StepGraphs):
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        rows: int,  # sequences (and sampling rows) a step may have
        buckets: list[int],  # token counts, increasing: a step's tokens, at most the last
        max_num_blocks_per_seq: int,
        prev_tokens: torch.Tensor,
        device: torch.device,
        kind: str = "prefill",
    ) -> None:
        super().__init__(
            model, buckets, rows, buckets[-1], max_num_blocks_per_seq, prev_tokens, device
        )
        self.kind = kind
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
            max_seqlen_q=bucket,  # any sequence of the step fits (the grid needs only the tokens)
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
