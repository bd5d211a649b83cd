"""RequestOutput crosses the engine process's pipe pickled: its hand-written ``__reduce__``."""

from __future__ import annotations

import dataclasses
import pickle

from scheduler_service.engine import RequestOutput
from scheduler_service.stop_checker import FinishReason


def test_a_pickled_request_output_comes_back_equal_in_every_field() -> None:
    output = RequestOutput(
        request_id="req-1",
        new_token_ids=[5, 7],
        new_text="hi",
        finished=True,
        finish_reason=FinishReason.STOP,
        num_prompt_tokens=11,
        num_output_tokens=2,
        num_cached_tokens=8,
        new_logprobs=[[(5, -0.25)], [(7, -1.5), (3, -2.0)]],
    )
    names = [f.name for f in dataclasses.fields(RequestOutput)]
    values = [getattr(output, name) for name in names]
    assert len(set(map(repr, values))) == len(names)  # distinct values: a swap would show
    copy = pickle.loads(pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL))
    assert copy == output
    assert [getattr(copy, name) for name in names] == values


def test_a_pickled_request_output_keeps_its_defaults() -> None:
    output = RequestOutput("req-2", [1], "", False, None, 3, 1, 0)
    assert pickle.loads(pickle.dumps(output)) == output
