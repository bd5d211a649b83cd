"""Triton compiles while a benchmark's timed pass runs: each one is a stall in a user's request.

The warm-up (scheduler_service/warm_up.py) is meant to leave nothing to compile; a kernel that
meets a new specialization later (an integer argument that is 1, a multiple of 16 or neither, a
pointer's alignment) compiles inside the step that met it, on the host, while the device waits:
the step's device time (measured between events around its launches) grows by the compile.
``watch_compiles`` records each compile's kernel and seconds through Triton's JIT hooks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


@contextlib.contextmanager
def watch_compiles() -> Iterator[list[tuple[str, float]]]:
    """``(kernel, seconds)`` of every Triton compile inside the block, in order."""
    from triton import knobs

    compiles: list[tuple[str, float]] = []
    began: dict[str, float] = {}

    def before(*, key, repr, fn, **_) -> None:
        began[str(key)] = time.perf_counter()
        return None  # a true value would skip the compile

    def after(*, key, repr, fn, **_) -> None:
        start = began.pop(str(key), time.perf_counter())
        name = repr.split("[", 1)[0].rsplit(".", 1)[-1]  # a qualified name's last part
        compiles.append((name, time.perf_counter() - start))

    hooks = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
    try:
        yield compiles
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = hooks


def describe(compiles: list[tuple[str, float]]) -> str:
    """One line: how many, how long, which kernels."""
    if not compiles:
        return "Triton compiles during the pass: none"
    names = sorted({name for name, _ in compiles})
    total = sum(seconds for _, seconds in compiles)
    return f"Triton compiles during the pass: {len(compiles)} ({total:.2f} s): " + ", ".join(names)
