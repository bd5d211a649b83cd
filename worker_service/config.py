"""WorkerConfig: every setting of one worker process, built once in main() and passed down."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: str
    device: str = "cpu"  # "cpu" or "cuda" (this rank's GPU is cuda:<local rank>)
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's half type or bfloat16 on GPU
    block_size: int = 256
    num_kv_blocks: int | None = None  # fixed count; else sized from the memory settings below
    kv_cache_gb: float | None = None  # CPU default 1 GB; on GPU overrides memory profiling
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 8192  # the warm-up forward's size when profiling memory
    max_num_seqs: int = 256  # the largest CUDA-graph batch
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    attention_backend: str = "auto"
    enforce_eager: bool = False
    max_prefill_graph_tokens: int = 8192  # prefill/mixed steps up to this many tokens replay graphs
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} is invalid: must be >= 1")
        if self.max_prefill_graph_tokens < 0:
            raise ValueError(
                f"max_prefill_graph_tokens={self.max_prefill_graph_tokens} is invalid: "
                "must be >= 0 (0: no prefill graphs)"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} is invalid: must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} is invalid: "
                "must be in (0, 1]"
            )
