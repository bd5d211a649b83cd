"""Token embedding of a step's ids, some of which the previous step sampled on the device.

With asynchronous scheduling a step is sent before the host has seen the tokens the step before
it sampled: those tokens' ids are still on the device, in ``prev_tokens`` (where every step
leaves its sampled tokens), and the step names them by row (``prev_rows[t] >= 0``: token ``t`` is
``prev_tokens[prev_rows[t]]``; otherwise it is ``input_ids[t]``). ``embed_tokens`` resolves the
ids and looks up their rows of the embedding in one kernel, one program per (token, block of the
hidden size), launched with programmatic dependent launch where it runs (kernels/pdl.py): what
took five kernels at the start of every step (a clamp, a gather, a compare, a select, the
lookup) is one.

``embed_tokens_ref`` is the same in torch (the layer's own torch path does the same off CUDA);
both copy rows, so they agree bit for bit. Not a layer: ``models.layers.embed_head`` decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.pdl import launch_options, wait_for_previous

BLOCK_HIDDEN = 1024  # hidden entries per program


def embed_tokens_ref(
    weight: torch.Tensor,  # [V, H]
    input_ids: torch.Tensor,  # [T] int64
    prev_rows: torch.Tensor | None = None,  # [T] int64, -1: the id is in input_ids
    prev_tokens: torch.Tensor | None = None,  # [R] int64
) -> torch.Tensor:  # [T, H]
    if prev_rows is not None:
        assert prev_tokens is not None
        input_ids = torch.where(prev_rows >= 0, prev_tokens[prev_rows.clamp(min=0)], input_ids)
    return F.embedding(input_ids, weight)


@triton.jit
def _embed_kernel(
    weight_ptr,
    ids_ptr,
    prev_rows_ptr,
    prev_tokens_ptr,
    out_ptr,
    hidden,
    stride_w,
    stride_o,
    HAS_PENDING: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    ident = tl.load(ids_ptr + token)  # the step's inputs: copied before its first kernel
    row = tl.load(prev_rows_ptr + token) if HAS_PENDING else -1
    wait_for_previous(USE_PDL)  # prev_tokens: the previous step's sampler wrote them
    if HAS_PENDING:
        pending = tl.load(prev_tokens_ptr + tl.maximum(row, 0))
        ident = tl.where(row >= 0, pending, ident)
    offs = block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    values = tl.load(weight_ptr + ident * stride_w + offs, mask=mask)
    tl.store(out_ptr + token * stride_o + offs, values, mask=mask)


def embed_tokens(
    weight: torch.Tensor,  # [V, H], contiguous in H
    input_ids: torch.Tensor,  # [T] int64
    prev_rows: torch.Tensor | None = None,  # [T] int64, -1: the id is in input_ids
    prev_tokens: torch.Tensor | None = None,  # [R] int64
) -> torch.Tensor:  # [T, H], weight's dtype
    """``embed_tokens_ref`` in one kernel. Ids must be in range (the worker checks them)."""
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"weight must be [V, H] contiguous in H, got {tuple(weight.shape)}")
    if input_ids.dim() != 1 or input_ids.dtype != torch.int64:
        raise ValueError("input_ids must be int64 of shape [T]")
    if prev_rows is not None and (
        prev_tokens is None
        or prev_rows.shape != input_ids.shape
        or prev_rows.dtype != torch.int64
        or prev_tokens.dtype != torch.int64
    ):
        raise ValueError("prev_rows must be int64 [T] like input_ids, with int64 prev_tokens")
    num_tokens, hidden = len(input_ids), weight.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=weight.dtype, device=weight.device)
    if num_tokens == 0:
        return out
    block_h = min(BLOCK_HIDDEN, triton.next_power_of_2(hidden))
    _embed_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        weight,
        input_ids,
        input_ids if prev_rows is None else prev_rows,  # HAS_PENDING off: neither is read
        input_ids if prev_tokens is None else prev_tokens,
        out,
        hidden,
        weight.stride(0),
        out.stride(0),
        HAS_PENDING=prev_rows is not None,
        BLOCK_H=block_h,
        **launch_options(weight.device),
    )
    return out
