"""The model's shape and constants, read from a Hugging Face checkpoint directory.

Torch-free on purpose: the CPU-only scheduler imports this to learn the vocabulary, EOS ids and
context length without pulling in torch. Only Qwen3 dense models are accepted; features nanoserve
does not implement (rope scaling, sliding-window attention) are refused here, loudly, rather than
silently computing something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3",)
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
DEFAULT_ROPE_THETA = 1_000_000.0
DEFAULT_MAX_POSITION_EMBEDDINGS = 32768  # transformers' Qwen3Config default


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Qwen3 causal LM, as the model and the scheduler need it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str  # checkpoint dtype name, e.g. "bfloat16"
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    attention_bias: bool
    model_type: str

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read ``config.json`` (required) and ``generation_config.json`` (optional)."""
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{model_dir} has no config.json")
        raw = json.loads(config_path.read_text())
        generation_path = model_dir / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
        return cls.from_dict(raw, generation, source=str(config_path))

    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        generation: dict[str, Any] | None = None,
        source: str = "config",
    ) -> ModelConfig:
        """Build from the parsed ``config.json`` (and ``generation_config.json``) dictionaries."""
        _check_supported(raw, source)
        heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(raw),
            max_position_embeddings=raw.get(
                "max_position_embeddings", DEFAULT_MAX_POSITION_EMBEDDINGS
            ),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype=raw.get("dtype") or raw.get("torch_dtype") or "float32",
            eos_token_ids=_eos_token_ids(raw, generation),
            bos_token_id=raw.get("bos_token_id"),
            attention_bias=bool(raw.get("attention_bias", False)),
            model_type=raw["model_type"],
        )


def _check_supported(raw: dict[str, Any], source: str) -> None:
    """Refuse configs of other architectures, with missing fields, or unsupported features."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported (expected one of "
            f"{SUPPORTED_MODEL_TYPES})"
        )
    missing = [name for name in REQUIRED_FIELDS if raw.get(name) is None]
    if missing:
        raise ValueError(f"{source}: required field(s) missing: {', '.join(missing)}")
    if raw.get("use_sliding_window"):
        raise ValueError(f"{source}: sliding-window attention is not supported")
    rope_type = _rope_section(raw).get("rope_type") or _rope_section(raw).get("type")
    if rope_type not in (None, "default"):
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")


def _rope_section(raw: dict[str, Any]) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5) or legacy ``rope_scaling``; empty when neither."""
    return raw.get("rope_parameters") or raw.get("rope_scaling") or {}


def _rope_theta(raw: dict[str, Any]) -> float:
    """Top-level ``rope_theta`` (published Qwen3 configs) or ``rope_parameters.rope_theta``."""
    theta = raw.get("rope_theta")
    if theta is None:
        theta = (raw.get("rope_parameters") or {}).get("rope_theta")
    return float(theta) if theta is not None else DEFAULT_ROPE_THETA


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _eos_token_ids(raw: dict[str, Any], generation: dict[str, Any] | None) -> tuple[int, ...]:
    """Union of config.json's and generation_config.json's ``eos_token_id``, first-seen order."""
    ids = _as_id_list(raw.get("eos_token_id"))
    if generation is not None:
        ids += _as_id_list(generation.get("eos_token_id"))
    return tuple(dict.fromkeys(ids))
