"""RequestStreams: a non-streaming request's outputs are held, merged, and delivered whole."""

from __future__ import annotations

import asyncio

from scheduler_service.engine import RequestOutput
from scheduler_service.request_streams import RequestStreams
from scheduler_service.stop_checker import FinishReason


def _out(i: int, finished: bool = False) -> RequestOutput:
    reason = FinishReason.LENGTH if finished else None
    logprobs = [[(i, -0.5 * i)]] if i % 2 else None
    return RequestOutput("r", [i], f"<{i}>", finished, reason, 3, i + 1, 0, logprobs)


def _drain(queue) -> list[RequestOutput]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def test_non_streaming_outputs_arrive_first_then_merged_at_the_end() -> None:
    async def run() -> list[RequestOutput]:
        streams = RequestStreams(max_buffer=4)
        queue = streams.open("r", session=1, stream=False)
        for i in range(10):  # more than max_buffer: held outputs never count against it
            assert streams.deliver([_out(i)]) == []
            if i == 0:
                assert [o.new_token_ids for o in _drain(queue)] == [[0]]  # first token at once
            else:
                assert queue.empty()
        streams.deliver([_out(10, finished=True)])
        return _drain(queue)

    merged, final = asyncio.run(run())
    assert merged.new_token_ids == list(range(1, 10)) and not merged.finished
    assert merged.new_text == "".join(f"<{i}>" for i in range(1, 10))
    assert merged.new_logprobs == [[(i, -0.5 * i)] for i in range(1, 10, 2)]
    assert merged.num_output_tokens == 10  # the latest output's counters
    assert final.finished and final.new_token_ids == [10]


def test_streaming_outputs_arrive_one_by_one() -> None:
    async def run() -> list[RequestOutput]:
        streams = RequestStreams(max_buffer=4)
        queue = streams.open("r", session=1, stream=True)
        for i in range(3):
            streams.deliver([_out(i)])
        return _drain(queue)

    assert [o.new_token_ids for o in asyncio.run(run())] == [[0], [1], [2]]
