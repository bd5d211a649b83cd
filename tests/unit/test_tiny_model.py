"""The embedded tiny model: deterministic bytes, a real Qwen3 checkpoint that transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.tiny import MARKER_NAME, MODEL_FILES, SPECIAL_TOKENS, write_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def _file_bytes(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


def test_two_writes_in_separate_processes_give_identical_bytes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    subprocess.run(
        [sys.executable, "-m", "models.tiny", "--out", str(tmp_path / "again")],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )
    assert _file_bytes(tmp_path / "again") == _file_bytes(tiny_model_dir)
    assert set(MODEL_FILES) | {MARKER_NAME} == set(_file_bytes(tiny_model_dir))


def test_rewrite_is_skipped_when_the_model_is_complete(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "m")
    mtimes = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    write_tiny_model(model_dir)
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == mtimes


def test_a_damaged_or_missing_file_is_rewritten(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "m")
    original = _file_bytes(model_dir)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "tokenizer.json").unlink()
    write_tiny_model(model_dir)
    assert _file_bytes(model_dir) == original


def test_config_describes_the_small_qwen3(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    tokenizer = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    num_tokens = len(tokenizer["model"]["vocab"])
    assert config["model_type"] == "qwen3"
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["vocab_size"] % 64 == 0
    assert num_tokens <= config["vocab_size"] < num_tokens + 64
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (64, 2, 16)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["tie_word_embeddings"] is True
    special_ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert special_ids == {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    assert config["eos_token_id"] == special_ids["<|im_end|>"]
    assert config["bos_token_id"] == special_ids["<|endoftext|>"]


def test_weights_use_the_hugging_face_names_and_init(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    expected = set(AutoModelForCausalLM.from_config(config).state_dict()) - {"lm_head.weight"}
    weights = load_file(tiny_model_dir / "model.safetensors")
    assert set(weights) == expected
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert torch.equal(weights["model.norm.weight"], torch.ones(64))
    assert torch.equal(weights["model.layers.1.self_attn.k_norm.weight"], torch.ones(16))
    assert weights["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)


def test_transformers_loads_the_model_and_runs_it(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.rope_parameters["rope_theta"] == 1_000_000
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    input_ids = torch.tensor([tokenizer("Hello, café 🙂")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids).logits  # [1, T, V]
    assert logits.shape == (1, input_ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
