"""The memory-bandwidth bound of a decode-heavy workload, from the copy bandwidth measured here.

Every decode step must read every weight once and the K/V of every active sequence once. Assuming
all requests decode together from the start (the batch fits), step t reads the weights plus the
K/V of every request still running at t. Prefill and sampling are ignored: the bound is a floor.
"""

from __future__ import annotations

import torch


def copy_bandwidth(device: torch.device, num_bytes: int = 2**30, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        seconds = sorted(times)[len(times) // 2]
    else:
        import time

        begin = time.perf_counter()
        for _ in range(3):
            dst.copy_(src)
        seconds = (time.perf_counter() - begin) / 3
    return 2 * num_bytes / seconds


def weight_bytes(cfg: dict, dtype_bytes: int = 2) -> int:
    h, d, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h + 2 * d
    embed = cfg["vocab_size"] * h * (1 if cfg["tie_word_embeddings"] else 2)
    return dtype_bytes * (cfg["num_hidden_layers"] * per_layer + embed + h)


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * dtype_bytes


def decode_bytes(cfg: dict, prompt_lens: list[int], output_lens: list[int]) -> int:
    """Bytes the decode steps must read at least, for requests that all start together."""
    num_steps = max(output_lens)
    kv_tokens = sum(p * n + n * (n - 1) // 2 for p, n in zip(prompt_lens, output_lens))
    return num_steps * weight_bytes(cfg) + kv_tokens * kv_bytes_per_token(cfg)
