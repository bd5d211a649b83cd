"""KvEventHub: the engine's KV events, numbered in batches and fanned out to subscribers.

The engine process sends one ``kv_events`` message per step that stored or removed prefix blocks
(BlockManager's ``BlocksStored``, ``BlocksRemoved``, ``CacheCleared``), and only while someone
subscribes: the hub tells the engine (``on_wanted``) when the first subscriber arrives and when
the last one leaves. Each message becomes one ``KvEventBatch`` with the next sequence number
(from 1: 0 means "from the current state" to a subscriber) and is queued to every subscriber.

A subscriber that asks for ``start_sequence_number`` N gets the batches from N on that the hub
still holds (the last ``max_history``, since the current run of subscriptions began), then live
ones; a subscriber learns nothing of blocks cached before its subscription (no snapshot), so a
gateway's index fills as traffic goes. A subscriber that falls ``max_queued`` batches behind is
dropped with ``Overloaded`` (RESOURCE_EXHAUSTED), so one slow reader cannot hold memory without
bound: it may subscribe again. Event loop only.
Not here: protobuf (kv_events_wire.py), what makes an event (block_manager.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from scheduler_service.block_manager import KvEvent
from scheduler_service.request_streams import Overloaded


@dataclass(frozen=True)
class KvEventBatch:
    sequence_number: int
    timestamp: float  # seconds since the epoch, when the front end received it
    events: list[KvEvent]


class KvEventHub:
    def __init__(
        self,
        on_wanted: Callable[[bool], None],
        max_history: int = 1024,
        max_queued: int = 4096,
    ) -> None:
        self.on_wanted = on_wanted
        self.max_queued = max_queued
        self._subscribers: set[asyncio.Queue[KvEventBatch | None]] = set()
        self._history: deque[KvEventBatch] = deque(maxlen=max_history)
        self._next_sequence_number = 1

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, events: list[KvEvent]) -> None:
        """Number one step's events and queue them to every subscriber (none: dropped)."""
        if not self._subscribers:
            return  # sent before the engine heard that the last subscriber left
        batch = KvEventBatch(self._next_sequence_number, time.time(), events)
        self._next_sequence_number += 1
        self._history.append(batch)
        for queue in list(self._subscribers):
            if queue.qsize() >= self.max_queued:
                self._leave(queue)
                queue.put_nowait(None)  # tells the subscriber it was dropped
            else:
                queue.put_nowait(batch)

    async def subscribe(self, start_sequence_number: int = 0) -> AsyncGenerator[KvEventBatch, None]:
        """Batches from ``start_sequence_number`` (0: live ones only) until the caller stops."""
        queue: asyncio.Queue[KvEventBatch | None] = asyncio.Queue()
        if start_sequence_number > 0:
            for held in self._history:
                if held.sequence_number >= start_sequence_number:
                    queue.put_nowait(held)
        self._join(queue)
        try:
            while True:
                batch = await queue.get()
                if batch is None:
                    raise Overloaded(
                        f"KV event subscriber fell {self.max_queued} batches behind: "
                        "subscribe again"
                    )
                yield batch
        finally:
            self._leave(queue)

    def _join(self, queue: asyncio.Queue[KvEventBatch | None]) -> None:
        self._subscribers.add(queue)
        if len(self._subscribers) == 1:
            self.on_wanted(True)

    def _leave(self, queue: asyncio.Queue[KvEventBatch | None]) -> None:
        if queue not in self._subscribers:
            return
        self._subscribers.remove(queue)
        if not self._subscribers:
            self._history.clear()  # the engine stops collecting: later batches do not follow on
            self.on_wanted(False)
