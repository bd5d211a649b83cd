"""Qwen3 dense causal LM for inference over a paged KV cache, tensor-parallel by construction.

Input is a packed batch: ``T`` new tokens of several sequences back to back, their absolute
positions, and the ``AttentionMetadata`` saying where their K/V go in the cache. There is no batch
dimension and no padding. Each rank holds its shard of every projection; the only communication is
inside the parallel layers (``all_reduce`` in row-parallel and embedding layers, a gather in the LM
head). Weight loading lives in ``models.loader``; this module builds empty parameters.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.layers.activation import linear_silu_and_mul
from models.layers.attention import Attention, AttentionBackend, AttentionMetadata, KVStore
from models.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from models.layers.layernorm import RMSNorm
from models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from models.layers.rotary import RotaryEmbedding
from models.parallel import SINGLE_RANK, ParallelContext


class Qwen3Attention(nn.Module):
    """QKV projection, per-head q/k RMSNorm, RoPE, the K/V store, paged attention, output
    projection."""

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, parallel: ParallelContext
    ) -> None:
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            d,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.attention_bias,
            parallel,
        )
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * d, config.hidden_size, config.attention_bias, parallel
        )
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(d, config.max_position_embeddings, config.rope_theta)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, backend)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        hidden: torch.Tensor,  # [T, hidden]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (H_q + 2 H_kv) D]
        q, k, v = qkv.split(
            [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], -1
        )
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H_q, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        # q_norm, k_norm and RoPE, then this step's K/V into the paged cache (one kernel on CUDA)
        q, k = self.qk_norm_rope_store_kv(positions, q, k, v, self.attn.kv_store(meta))
        out = self.attn(q, k, v, meta)  # [T, H_q D], reading this step's K/V from the cache
        return self.o_proj(out)

    def qk_norm_rope_store_kv(
        self,
        positions: torch.Tensor,  # [T]
        q: torch.Tensor,  # [T, H_q, D], overwritten on CUDA
        k: torch.Tensor,  # [T, H_kv, D], overwritten on CUDA
        v: torch.Tensor,  # [T, H_kv, D]
        kv_store: KVStore | None,  # None: no cache bound (memory profiling), nothing stored
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope(q_norm(q)), rope(k_norm(k))``, and that k with ``v`` stored at ``kv_store``.

        On CUDA the norms and RoPE are one Triton kernel writing into qkv, which also does the
        store when the backend allows it (one launch per layer instead of two); elsewhere the
        torch modules. Whatever was not fused, the backend then stores.
        """
        if q.is_cuda:
            from kernels import qk_norm_rope as fused  # triton is imported only where it runs

            rope = self.rotary_emb
            args = (self.q_norm.weight, self.k_norm.weight, rope.cos_cache, rope.sin_cache)
            eps = self.q_norm.eps  # k_norm's too: both are config.rms_norm_eps
            if kv_store is not None and self.attn.fuses_kv_store:
                return fused.qk_norm_rope_store_kv(positions, q, k, v, *args, eps, *kv_store)
            q, k = fused.qk_norm_rope(positions, q, k, *args, eps)
        else:
            q, k = self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))
        if kv_store is not None:
            self.attn.store_kv(k, v, kv_store)
        return q, k


class Qwen3MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one column-parallel matmul."""

    def __init__(self, config: ModelConfig, parallel: ParallelContext) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], False, parallel
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, False, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        gate_up = self.gate_up_proj  # [T, 2I / world], then the activation: one kernel at decode
        return self.down_proj(linear_silu_and_mul(x, gate_up.weight, gate_up.bias))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; residual adds are fused into the following norm."""

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, parallel: ParallelContext
    ) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, backend, parallel)
        self.mlp = Qwen3MLP(config, parallel)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        hidden: torch.Tensor,  # [T, hidden]: previous block's output (not yet added)
        residual: torch.Tensor | None,  # [T, hidden]: running residual; None for layer 0
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (block output, residual), both [T, hidden]
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3Model(nn.Module):
    """Embedding, decoder layers and final norm: token ids to final hidden states."""

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, parallel: ParallelContext
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, backend, parallel) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        meta: AttentionMetadata,
        prev_rows: torch.Tensor | None = None,  # [T] int64: VocabParallelEmbedding's
        prev_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, hidden]
        hidden = self.embed_tokens(input_ids, prev_rows, prev_tokens)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 with its LM head. ``forward`` returns hidden states; ``compute_logits`` the logits.

    Checkpoint names ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` load into
    the fused ``qkv_proj`` and ``gate_up_proj`` through ``packed_modules_mapping``.
    """

    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        parallel: ParallelContext = SINGLE_RANK,
    ) -> None:
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.model = Qwen3Model(config, backend, parallel)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        meta: AttentionMetadata,
        prev_rows: Tensor | None = None,
        prev_tokens: Tensor | None = None,
    ) -> Tensor:
        """Qwen3Model's: input_ids [T] int64, positions [T] int64 -> hidden [T, hidden]; where
        ``prev_rows[t] >= 0`` the id is ``prev_tokens[prev_rows[t]]`` (the previous step's)."""
        return self.model(input_ids, positions, meta, prev_rows, prev_tokens)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``hidden: [B, hidden]`` -> ``[B, vocab]`` (model dtype) on rank 0, None elsewhere."""
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        """One ``Attention`` per decoder layer, in order; the worker binds ``k_cache``/``v_cache``."""
        return [module for module in self.modules() if isinstance(module, Attention)]
