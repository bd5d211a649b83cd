"""bench.compile_watch records the Triton compiles inside its block, and only those."""

from __future__ import annotations

import pytest
import torch

from bench.compile_watch import describe, watch_compiles


def test_no_compiles_read_as_none() -> None:
    with watch_compiles() as compiles:
        pass
    assert compiles == [] and describe(compiles) == "Triton compiles during the pass: none"
    assert describe([("k", 0.5), ("k", 0.25)]) == "Triton compiles during the pass: 2 (0.75 s): k"


@pytest.mark.gpu
def test_gpu_a_new_specialization_compiles_once_and_is_recorded() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one(x_ptr, n):
        i = tl.arange(0, 16)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    x = torch.zeros(16, device="cuda")
    with watch_compiles() as compiles:
        _add_one[(1,)](x, 16)  # n a multiple of 16: one specialization
        _add_one[(1,)](x, 16)  # the same: no compile
        _add_one[(1,)](x, 7)  # another
    assert [name for name, _ in compiles] == ["_add_one", "_add_one"]
    assert all(seconds >= 0 for _, seconds in compiles)
    with watch_compiles() as later:
        _add_one[(1,)](x, 5)  # the "neither" specialization again: compiled already
    assert later == []
    assert x[:7].tolist() == [4.0] * 5 + [3.0] * 2 and x[7:].tolist() == [2.0] * 9
