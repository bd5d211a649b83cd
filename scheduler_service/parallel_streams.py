"""Running n response streams of one request at once (vLLM's ``n`` parallel samples).

``merge_streams`` yields the items of several async generators as they come. The first one starts
alone; the others start once it signals that its prompt has been scheduled (``first_ready``): by
then the prompt's full blocks are committed to the prefix cache, so the other samples hit them
instead of computing the prompt again (the block manager registers a block's hash only once its
K/V are computed, so samples admitted in one step could not share). Closing the merged stream (a
cancelled call) cancels every stream, which closes each one's request; an error in one ends all.
Not here: what a stream yields (vllm_engine.py), request ids and seeds (vllm_wire.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import TypeVar, cast

T = TypeVar("T")
_DONE = object()


async def merge_streams(
    make_stream: Callable[[int, asyncio.Event | None], AsyncGenerator[T, None]],
    num_streams: int,
    share_prompt: bool,
) -> AsyncGenerator[T, None]:
    """The items of ``make_stream(index, first_ready)`` for each index, as they come. Stream 0
    gets an event to set once its prompt is scheduled; with ``share_prompt`` the others wait for
    it (or for stream 0 to end), else all start at once (a prompt with no full block)."""
    queue: asyncio.Queue[object] = asyncio.Queue()
    first_ready = asyncio.Event()

    async def pump(index: int) -> None:
        try:
            if index and share_prompt:
                await first_ready.wait()
            async with aclosing(make_stream(index, None if index else first_ready)) as stream:
                async for item in stream:
                    queue.put_nowait(item)
        except Exception as e:  # ends the merged stream with it
            queue.put_nowait(e)
        finally:
            first_ready.set()  # stream 0 ended early: the others go on (and meet its fate)
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(index)) for index in range(num_streams)]
    try:
        num_running = num_streams
        while num_running:
            item = await queue.get()
            if item is _DONE:
                num_running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield cast(T, item)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
