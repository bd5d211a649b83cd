"""Load a Hugging Face safetensors checkpoint into a (possibly tensor-parallel) Qwen3ForCausalLM.

Each checkpoint tensor is opened lazily (``safe_open(...).get_slice``) and handed, whole, to its
parameter's ``weight_loader``, which reads only this rank's rows or columns. Names of unfused
checkpoint projections (``q_proj``, ``gate_proj``, ...) are mapped to the fused parameters through
the model's ``packed_modules_mapping``. Loading is strict: an unknown checkpoint tensor or a
parameter left unloaded is a ``ValueError`` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from models.config import ModelConfig
from models.layers.attention import AttentionBackend
from models.layers.linear import ShardId, weight_loader_of
from models.parallel import SINGLE_RANK, ParallelContext
from models.qwen3 import Qwen3ForCausalLM

INDEX_FILE = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The shards named by the index's ``weight_map`` when present, else every ``*.safetensors``."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def param_target(name: str, mapping: Mapping[str, tuple[str, ShardId]]) -> tuple[str, ShardId]:
    """Checkpoint tensor name -> (model parameter name, shard id or None)."""
    for checkpoint_key, (param_key, shard_id) in mapping.items():
        if f".{checkpoint_key}." in name:
            return name.replace(f".{checkpoint_key}.", f".{param_key}."), shard_id
    return name, None


def expected_checkpoint_names(model: Qwen3ForCausalLM) -> set[str]:
    """Every checkpoint tensor name the model's parameters need (unfused names for fused ones)."""
    names: set[str] = set()
    for param_name, _ in model.named_parameters():  # tied lm_head is deduplicated away
        sources = [
            param_name.replace(f".{param_key}.", f".{checkpoint_key}.")
            for checkpoint_key, (param_key, _) in model.packed_modules_mapping.items()
            if f".{param_key}." in param_name
        ]
        names.update(sources or [param_name])
    return names


def load_tensor(param: torch.nn.Parameter, name: str, loaded: Any, shard_id: ShardId) -> None:
    """Call the parameter's weight loader, naming the tensor in any shape error."""
    loader = weight_loader_of(param)
    try:
        if shard_id is None:
            loader(param, loaded)
        else:
            loader(param, loaded, shard_id)
    except ValueError as err:
        raise ValueError(f"checkpoint tensor {name!r}: {err}") from err


@torch.no_grad()
def load_weights(model: Qwen3ForCausalLM, model_dir: str | Path) -> None:
    """Copy this rank's share of every checkpoint tensor in ``model_dir`` into ``model``."""
    model_dir = Path(model_dir)
    params = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    loaded_names: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if tied and name == LM_HEAD:
                    continue  # the head shares the embedding weight
                param_name, shard_id = param_target(name, model.packed_modules_mapping)
                if param_name not in params:
                    raise ValueError(
                        f"checkpoint tensor {name!r} ({path.name}) matches no parameter"
                    )
                load_tensor(params[param_name], name, f.get_slice(name), shard_id)
                loaded_names.add(name)
    missing = expected_checkpoint_names(model) - loaded_names
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks tensor(s): {', '.join(sorted(missing))}")


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make ``dtype`` the default for new floating-point tensors."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model_dir: str | Path,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    parallel: ParallelContext = SINGLE_RANK,
) -> Qwen3ForCausalLM:
    """Build the model directly on ``device`` in ``dtype``, load its weights, return it in eval mode."""
    config = ModelConfig.from_dir(model_dir)
    with default_dtype(dtype), torch.device(device):
        model = Qwen3ForCausalLM(config, backend, parallel)
    load_weights(model, model_dir)
    return model.eval()
