"""Shared test setup: the GPU marker, Triton's CPU interpreter, the GPU tests' attention backend
(``--attention-backend``), and the tiny model fixture."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU only through the interpreter; it must be set before triton loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = [
    "tests.kv_invariants"
]  # every in-process engine ends each test with no block held
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--attention-backend",
        default="auto",
        help="the GPU engine tests' worker attention backend (e.g. flash-attn; default auto)",
    )


@pytest.fixture(scope="session")
def attention_backend(request: pytest.FixtureRequest) -> str:
    """What the GPU engine tests pass as ``--attention-backend`` (pytest --attention-backend)."""
    return request.config.getoption("--attention-backend")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model, written fresh by the test session."""
    from models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def copy_tokenizer(tiny_model_dir: Path, model_dir: Path) -> None:
    """Give a transformers-written checkpoint the tiny model's tokenizer (its vocab must fit)."""
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, model_dir / name)
