"""RequestStreams: the per-request output queues of live Generate calls (event loop only).

Each live request has one asyncio queue that the engine thread's outputs are delivered to (via
``call_soon_threadsafe``) and that its Generate call reads. A queue holds at most ``max_buffer``
undelivered step outputs: a client that stops reading stalls its own call's writes, never the
step loop, and past the bound its stream is dropped with ``SlowClient`` so the caller can abort
the request and free its blocks. A non-streaming request gets its first output at once (so time to
first token is measured) and the rest together when it finishes: waking each of a few hundred
waiting calls on every step would cost the step loop the time it shares the GIL with.
Not here: commands to the engine (engine_loop.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field

from scheduler_service.engine import RequestOutput

log = logging.getLogger(__name__)
OutputQueue = asyncio.Queue[RequestOutput | Exception]


class Unavailable(Exception):
    """No worker answers (or the server is draining): UNAVAILABLE."""


class Overloaded(Exception):
    """The waiting queue or the stream limit is full: RESOURCE_EXHAUSTED."""


class SlowClient(Overloaded):
    """The client left more than ``max_stream_buffer`` outputs unread: its request was aborted."""


@dataclass
class _Held:
    """A non-streaming request's outputs since its first, merged as they come: a few lists per
    request instead of an object per token (which the garbage collector would walk, long pauses
    of the step loop included, for as long as the request lives)."""

    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.new_token_ids
        if out.new_text:
            self.text.append(out.new_text)
        if out.new_logprobs:
            self.logprobs += out.new_logprobs
        self.last = out

    def merged(self) -> RequestOutput | None:
        if self.last is None:
            return None
        return dataclasses.replace(
            self.last,
            new_token_ids=self.token_ids,
            new_text="".join(self.text),
            new_logprobs=self.logprobs or None,
        )


@dataclass
class _Stream:
    queue: OutputQueue
    session: int  # the worker session it was submitted to
    held: _Held | None = None  # non-streaming: outputs kept until it finishes
    started: bool = False  # an output was delivered already


class RequestStreams:
    def __init__(self, max_buffer: int) -> None:
        self.max_buffer = max_buffer
        self._streams: dict[str, _Stream] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def open(self, request_id: str, session: int, stream: bool = True) -> OutputQueue:
        queue: OutputQueue = asyncio.Queue()
        self._streams[request_id] = _Stream(queue, session, held=None if stream else _Held())
        return queue

    def close(self, request_id: str) -> bool:
        """Forget a stream; whether it was still open."""
        return self._streams.pop(request_id, None) is not None

    def deliver(self, outputs: list[RequestOutput]) -> list[str]:
        """Queue each output on its stream; return the ids of streams dropped as too slow."""
        dropped = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if stream.held is not None and stream.started and not out.finished:
                stream.held.add(out)
            elif stream.queue.qsize() >= self.max_buffer and not out.finished:
                self._drop(out.request_id, stream)
                dropped.append(out.request_id)
            else:
                held = stream.held.merged() if stream.held is not None else None
                if held is not None:
                    stream.queue.put_nowait(held)
                    stream.held = _Held()
                stream.queue.put_nowait(out)
                stream.started = True
        return dropped

    def fail(self, request_id: str, error: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.queue.put_nowait(error)

    def fail_all(self, error: Exception, session: int) -> None:
        """Fail every stream submitted to ``session`` or before (later ones live on)."""
        for stream in self._streams.values():
            if stream.session <= session:
                stream.queue.put_nowait(error)

    def _drop(self, request_id: str, stream: _Stream) -> None:
        num_unread = stream.queue.qsize()
        log.warning("request %r dropped: its client left %d outputs unread", request_id, num_unread)
        del self._streams[request_id]
        stream.queue.put_nowait(
            SlowClient(
                f"the client left {num_unread} outputs unread "
                f"(--max-stream-buffer {self.max_buffer}): request aborted"
            )
        )
