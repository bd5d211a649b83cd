"""nanoserve's Qwen3 (paged KV cache, packed batches) against transformers' own Qwen3, in float32.

Checkpoints are written by transformers' ``save_pretrained`` from seeded random models, with norm
weights and biases randomised too so that every parameter influences the logits. The reference
runs each sequence alone with eager attention; nanoserve runs all of them packed into one prefill,
then one decode step per sequence through the cache the prefill filled.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config
from transformers import Qwen3ForCausalLM as HFQwen3ForCausalLM

from models.config import ModelConfig
from models.loader import load_model
from models.qwen3 import Qwen3ForCausalLM
from tests.helpers_attention import (
    bind_kv_caches,
    build_metadata,
    round_robin_block_tables,
    step_positions,
)
from worker_service.attention_backends import TorchRefBackend

BLOCK_SIZE = 4
PROMPT_LENS = [5, 1, 11, 8]
TINY_SHAPES = {
    # head_dim 32, GQA 4:2, tied embeddings, q width (128) != hidden (64)
    "gqa2_tied_head32": dict(
        hidden_size=64, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, num_hidden_layers=2,
    ),
    # head_dim 64, a single KV head, untied, q/k/v/o biases, saved as several shards
    "one_kv_head_untied_bias_sharded": dict(
        hidden_size=96, head_dim=64, num_attention_heads=4, num_key_value_heads=1,
        tie_word_embeddings=False, attention_bias=True, num_hidden_layers=3,
    ),
    # head_dim 16, plain multi-head 4:4, untied, rope_theta at its Qwen3 default
    "mha_untied_head16": dict(
        hidden_size=48, head_dim=16, num_attention_heads=4, num_key_value_heads=4,
        tie_word_embeddings=False, num_hidden_layers=2,
    ),
}  # fmt: skip


def write_tiny_checkpoint(model_dir: Path, name: str) -> HFQwen3ForCausalLM:
    """Seeded random transformers Qwen3, saved to ``model_dir``; returns it in eval mode."""
    torch.manual_seed(sum(map(ord, name)))
    rope = {"rope_type": "default", "rope_theta": 1e6 if "mha" in name else 10000.0}
    config = Qwen3Config(
        vocab_size=173, intermediate_size=80, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters=rope, initializer_range=0.1, eos_token_id=2, bos_token_id=1,
        **TINY_SHAPES[name],
    )  # fmt: skip
    hf = HFQwen3ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in hf.named_parameters():
            if "norm" in param_name:
                param.normal_(1.0, 0.3)
            elif param_name.endswith("bias"):
                param.normal_(0.0, 0.1)
    shard_size = 200_000 if "sharded" in name else "5GB"
    hf.save_pretrained(model_dir, max_shard_size=shard_size)
    return hf.eval()


def reference_logits(hf: HFQwen3ForCausalLM, token_ids: list[torch.Tensor]) -> torch.Tensor:
    """transformers' logits for every token of every sequence, each run alone, packed: [T, V]."""
    with torch.no_grad():
        return torch.cat([hf(input_ids=ids[None]).logits[0] for ids in token_ids])


def run_step(
    model: Qwen3ForCausalLM,
    input_ids: torch.Tensor,
    tables: list[list[int]],
    seq_lens: list[int],
    query_lens: list[int],
) -> torch.Tensor:  # [T, V]
    meta = build_metadata(tables, BLOCK_SIZE, seq_lens, query_lens)
    with torch.no_grad():
        hidden = model(input_ids, step_positions(seq_lens, query_lens), meta)
        logits = model.compute_logits(hidden)
    assert logits is not None
    return logits


@pytest.mark.parametrize("name", list(TINY_SHAPES))
def test_packed_prefill_then_decode_matches_transformers(tmp_path: Path, name: str) -> None:
    hf = write_tiny_checkpoint(tmp_path, name)
    if "sharded" in name:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = load_model(tmp_path, TorchRefBackend(), torch.float32, torch.device("cpu"))
    tables = round_robin_block_tables([n + 1 for n in PROMPT_LENS], BLOCK_SIZE)
    num_blocks = sum(len(table) for table in tables)
    bind_kv_caches(model.attention_layers(), num_blocks, BLOCK_SIZE, torch.float32)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 173, (n,), generator=generator) for n in PROMPT_LENS]
    next_ids = torch.randint(0, 173, (len(PROMPT_LENS),), generator=generator)

    prefill = run_step(model, torch.cat(prompts), tables, PROMPT_LENS, PROMPT_LENS)
    torch.testing.assert_close(prefill, reference_logits(hf, prompts), atol=1e-4, rtol=1e-4)

    decode_lens = [n + 1 for n in PROMPT_LENS]
    decode = run_step(model, next_ids, tables, decode_lens, [1] * len(PROMPT_LENS))
    full = [torch.cat([p, next_ids[b : b + 1]]) for b, p in enumerate(prompts)]
    expected = torch.stack([reference_logits(hf, [ids])[-1] for ids in full])
    torch.testing.assert_close(decode, expected, atol=1e-4, rtol=1e-4)


def test_tied_checkpoint_without_lm_head_shares_the_embedding(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, "gqa2_tied_head32")
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = load_model(tmp_path, TorchRefBackend(), torch.float32, torch.device("cpu"))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_tensor_raises_value_error_naming_it(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, "mha_untied_head16")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(tmp_path, TorchRefBackend(), torch.float32, torch.device("cpu"))


def test_wrongly_shaped_tensor_raises_value_error_naming_it(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, "mha_untied_head16")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_model(tmp_path, TorchRefBackend(), torch.float32, torch.device("cpu"))


def rewrite_config(model_dir: Path, edit: dict[str, object], drop: tuple[str, ...] = ()) -> None:
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    raw.update(edit)
    for key in drop:
        raw.pop(key, None)
    path.write_text(json.dumps(raw))


def test_rope_theta_is_read_from_rope_parameters_and_from_top_level(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, "gqa2_tied_head32")
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_theta"]
    assert ModelConfig.from_dir(tmp_path).rope_theta == 10000.0
    rewrite_config(tmp_path, {"rope_theta": 5e5, "rope_scaling": None}, drop=("rope_parameters",))
    assert ModelConfig.from_dir(tmp_path).rope_theta == 5e5
    rewrite_config(tmp_path, {}, drop=("rope_theta",))
    assert ModelConfig.from_dir(tmp_path).rope_theta == 1e6


def test_config_reads_shape_dtype_and_eos_union(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, "one_kv_head_untied_bias_sharded")
    rewrite_config(tmp_path, {"eos_token_id": [2, 7]}, drop=("dtype",))
    rewrite_config(tmp_path, {"torch_dtype": "bfloat16"})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    config = ModelConfig.from_dir(tmp_path)
    assert config.eos_token_ids == (2, 7, 9)
    assert (config.head_dim, config.num_key_value_heads, config.dtype) == (64, 1, "bfloat16")
    assert config.attention_bias and not config.tie_word_embeddings
    rewrite_config(tmp_path, {"head_dim": None})
    assert ModelConfig.from_dir(tmp_path).head_dim == 96 // 4


@pytest.mark.parametrize(
    ("edit", "message"),
    [({"model_type": "llama"}, "model_type"), ({"hidden_size": None}, "hidden_size")],
)
def test_unsupported_or_incomplete_config_raises_value_error(
    tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    rewrite_config(tmp_path, {**TINY_SHAPES["mha_untied_head16"], "vocab_size": 9, **edit})
    rewrite_config(tmp_path, {"intermediate_size": 8})
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dir(tmp_path)


def test_model_config_imports_without_torch() -> None:
    code = "import sys, models, models.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
