"""The services read the environment in ``main()`` only (and through protos/envargs.py, which
turns variables into flag defaults there): no constructor, import or helper deep inside reads it.

Every ``os.environ``, ``environ`` imported from ``os``, and ``getenv`` in the service packages,
the contract and the models is found with ``ast`` and must sit inside a function named ``main``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protos", "scheduler_service", "worker_service", "models")
ALLOWED_FILES = {"protos/envargs.py"}  # the one place that maps variables onto flags
# (file, function) reads that are not configuration. TRITON_INTERPRET is Triton's own switch,
# read by Triton at import; the backend only checks it is set before choosing Triton on CPU.
KNOWN_EXCEPTIONS = {("worker_service/attention_backends.py", "_build")}


def environment_reads(path: Path) -> list[tuple[int, str]]:
    """(line, enclosing function or "<module>") of every environment read in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if _reads_environment(node):
            found.append((getattr(node, "lineno", 0), function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def _reads_environment(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv"):
        return isinstance(node.value, ast.Name) and node.value.id == "os"
    if isinstance(node, ast.ImportFrom) and node.module == "os":
        return any(alias.name in ("environ", "environb", "getenv") for alias in node.names)
    return False


def test_the_finder_sees_reads_in_constructors_and_at_import(tmp_path) -> None:
    source = tmp_path / "bad.py"
    source.write_text(
        "import os\nfrom os import environ\nX = os.getenv('A')\n"
        "class C:\n    def __init__(self):\n        self.p = os.environ.get('B')\n"
        "def main():\n    return os.environ['C']\n"
    )
    assert environment_reads(source) == [
        (2, "<module>"),
        (3, "<module>"),
        (6, "__init__"),
        (8, "main"),
    ]


def test_services_contract_and_models_read_the_environment_in_main_only() -> None:
    misplaced = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name in ALLOWED_FILES:
                continue
            for line, function in environment_reads(path):
                if function != "main" and (name, function) not in KNOWN_EXCEPTIONS:
                    misplaced.append(f"{name}:{line} in {function}")
    assert misplaced == []
