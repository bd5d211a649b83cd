"""Write a random-weight checkpoint with a published architecture (no download needed).

With ``ignore_eos`` the work a benchmark does does not depend on the weights, so random weights
give the same throughput as the real checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

QWEN3_8B = dict(
    QWEN3_0_6B,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)

ARCHITECTURES = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-8b": QWEN3_8B}


def _shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, d = cfg["hidden_size"], cfg["head_dim"]
    q, kv, inter = (
        cfg["num_attention_heads"] * d,
        cfg["num_key_value_heads"] * d,
        cfg["intermediate_size"],
    )
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "self_attn.q_norm.weight": (d,),
                p + "self_attn.k_norm.weight": (d,),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return shapes


def write_tokenizer(out: Path) -> None:
    """The tiny model's tokenizer (the scheduler service needs one; benchmarks send token ids)."""
    from models.tiny import tokenizer_config, train_tokenizer

    tokenizer = train_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer), indent=2))


def write_random_checkpoint(out: Path, arch: str, seed: int = 0) -> Path:
    """Write config.json + model.safetensors (bf16, N(0, 0.02), norms at 1) if not there yet."""
    cfg = ARCHITECTURES[arch]
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer.json").exists():
        write_tokenizer(out)
    if (out / "model.safetensors").exists():
        return out
    # Drawn on the GPU where there is one: an 8B checkpoint's 8e9 numbers take minutes on a CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, shape in _shapes(cfg).items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            weight = torch.randn(shape, generator=gen, device=device) * 0.02
            tensors[name] = weight.to(torch.bfloat16).cpu()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def add_checkpoint_args(
    parser: argparse.ArgumentParser,
    arch: str = "qwen3-0.6b",
    directory: str = "/tmp/nanoserve-bench",
) -> None:
    """``--arch``, ``--model`` and ``--checkpoint-dir``, as every benchmark takes them."""
    parser.add_argument("--arch", default=arch, choices=sorted(ARCHITECTURES))
    parser.add_argument("--model", help="checkpoint dir (default: a random --arch checkpoint)")
    parser.add_argument("--checkpoint-dir", default=directory, help="where random ones go")


def checkpoint_from_args(args: argparse.Namespace) -> str:
    """``--model``, or the random ``--arch`` checkpoint under ``--checkpoint-dir`` (written once)."""
    if args.model:
        return args.model
    return str(write_random_checkpoint(Path(args.checkpoint_dir) / args.arch, args.arch))
