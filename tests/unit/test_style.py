"""House style holds: ruff is clean everywhere, mypy on both services, the models and the contract,
and no source file outside tests/ grows past 300 lines."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    module = args[0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (requirements-dev.txt)")
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=180
    )


def test_ruff_finds_nothing() -> None:
    result = run_tool("ruff", "check", ".")
    assert result.returncode == 0, result.stdout[-3000:]


def test_ruff_format_is_applied() -> None:
    result = run_tool("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout[-3000:]


TYPED_PACKAGES = ("protos", "scheduler_service", "worker_service", "models")
MAX_LINES = 300


def test_services_models_and_contract_type_check() -> None:
    result = run_tool("mypy", *TYPED_PACKAGES, "--follow-imports=silent")
    assert result.returncode == 0, result.stdout[-3000:]


def test_no_source_file_outside_tests_passes_300_lines() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    long = {}
    for name in tracked:
        if name.startswith("tests/") or not (ROOT / name).exists():
            continue
        num_lines = len((ROOT / name).read_text().splitlines())
        if num_lines > MAX_LINES:
            long[name] = num_lines
    assert long == {}
