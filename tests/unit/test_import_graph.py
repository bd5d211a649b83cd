"""Imports run one way: protos -> scheduler_service / worker_service -> models -> kernels.

Every import statement of every module (top level and inside functions) is read with ``ast``; an
import of a package a module's own package must not depend on fails the test with the file and
line. A second check imports every worker module in a fresh interpreter and finds no scheduler
module loaded, which also catches imports the source walk cannot see.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRONT = {"nanoserve"}  # the CLI, the launcher and the offline LLM: nothing imports it back
# package -> the first-party and heavy packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "protos": {"scheduler_service", "worker_service", "models", "kernels", "torch", "triton"}
    | FRONT,
    "scheduler_service": {"worker_service", "models", "kernels", "torch", "triton", "transformers"}
    | FRONT,
    "worker_service": {"scheduler_service"} | FRONT,
    "models": {"scheduler_service", "worker_service", "protos", "grpc"} | FRONT,
    "kernels": {"scheduler_service", "worker_service", "protos", "models", "grpc"} | FRONT,
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def backward_imports(package: str, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue  # generated stubs import only protobuf, grpc and each other
        for line, imported in imported_packages(path):
            if imported in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(root)}:{line} imports {imported}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_it_must_not(package: str) -> None:
    assert backward_imports(package) == []


def test_the_walk_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    (tmp_path / "worker_service").mkdir()
    (tmp_path / "worker_service" / "bad.py").write_text(
        "def f():\n    from scheduler_service.scheduler import Scheduler\n"
    )
    assert backward_imports("worker_service", tmp_path) == [
        "worker_service/bad.py:2 imports scheduler_service"
    ]


def test_importing_every_worker_module_loads_no_scheduler_code() -> None:
    modules = sorted(
        f"worker_service.{p.stem}"
        for p in (ROOT / "worker_service").glob("*.py")
        if p.stem not in ("__init__", "__main__")
    )
    code = "\n".join(f"import {m}" for m in modules) + (
        "\nimport sys\nbad = [m for m in sys.modules if m.split('.')[0] in "
        "('scheduler_service', 'nanoserve', 'xxhash')]\nassert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(modules) >= 10
