"""The scheduler service is CPU-only: importing every module of it never loads torch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import scheduler_service


def test_importing_every_scheduler_module_leaves_torch_unloaded() -> None:
    modules = [
        f"scheduler_service.{m.name}" for m in pkgutil.iter_modules(scheduler_service.__path__)
    ]
    modules = [m for m in modules if not m.endswith("__main__")]
    code = "\n".join(f"import {m}" for m in modules) + (
        "\nimport sys\nbad = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]"
        "\nassert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(modules) >= 8
