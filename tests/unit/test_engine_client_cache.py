"""EngineClient's prefix-cache side: flushes answered by id, KV events fanned out, collection
turned on for the first subscriber and off after the last, a slow subscriber dropped.

The engine process is replaced by a recorder of the commands the client sends (the pipe's
``add``/``abort``/``flush``/``kv_events``); the engine's events are the ``on_*`` calls it makes.
"""

from __future__ import annotations

import asyncio

import pytest

from protos.step_plan import WorkerInfo
from scheduler_service.block_manager import BlocksRemoved, BlocksStored, CacheCleared
from scheduler_service.config import SchedulerServiceConfig
from scheduler_service.engine_client import EngineClient
from scheduler_service.kv_event_hub import KvEventHub
from scheduler_service.request_streams import Overloaded

INFO = WorkerInfo("m", "m", 100, 64, (0,), 16, 8, "float32", "torch", "cpu")


class Commands:
    def __init__(self) -> None:
        self.flushes: list[int] = []
        self.wanted: list[bool] = []

    def add(self, *args: object) -> None:
        pass

    def abort(self, request_ids: list[str]) -> None:
        pass

    def flush(self, flush_id: int) -> None:
        self.flushes.append(flush_id)

    def kv_events(self, wanted: bool) -> None:
        self.wanted.append(wanted)


def serving_client() -> tuple[EngineClient, Commands]:
    commands = Commands()
    client = EngineClient(SchedulerServiceConfig(model_dir="m", worker_addrs=("a:1",)), commands)
    client.on_session(INFO, 64, 1)
    return client, commands


async def wait_for_flushes(commands: Commands, count: int) -> None:
    while len(commands.flushes) < count:
        await asyncio.sleep(0)


def test_each_flush_gets_the_answer_sent_with_its_id() -> None:
    async def scenario() -> tuple[bool, bool]:
        client, commands = serving_client()
        first = asyncio.ensure_future(client.flush_cache())
        second = asyncio.ensure_future(client.flush_cache())
        await wait_for_flushes(commands, 2)
        client.on_flushed(commands.flushes[1], False)
        client.on_flushed(commands.flushes[0], True)
        return await first, await second

    assert asyncio.run(scenario()) == (True, False)


def test_a_flush_is_false_without_a_session_and_when_the_engine_process_goes() -> None:
    async def scenario() -> tuple[bool, bool]:
        client, commands = serving_client()
        pending = asyncio.ensure_future(client.flush_cache())
        await wait_for_flushes(commands, 1)
        client.engine_gone()
        return await pending, await client.flush_cache()

    assert asyncio.run(scenario()) == (False, False)


def test_events_reach_every_subscriber_and_collection_follows_the_subscribers() -> None:
    stored = BlocksStored([1, 2], [[0] * 16, [1] * 16], None)

    async def scenario() -> tuple[list, list, list[bool]]:
        client, commands = serving_client()
        client.on_kv_events([CacheCleared()])  # nobody subscribes: dropped
        streams = [client.kv_events.subscribe(), client.kv_events.subscribe()]
        firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
        while client.kv_events.num_subscribers < 2:
            await asyncio.sleep(0)
        client.on_kv_events([stored])
        client.on_kv_events([BlocksRemoved([1])])
        got = [await f for f in firsts]
        seconds = [await s.__anext__() for s in streams]
        for s in streams:
            await s.aclose()
        return got, seconds, commands.wanted

    got, seconds, wanted = asyncio.run(scenario())
    assert [(b.sequence_number, b.events) for b in got] == [(1, [stored])] * 2
    assert [(b.sequence_number, b.events) for b in seconds] == [(2, [BlocksRemoved([1])])] * 2
    assert wanted == [True, False]  # on for the first subscriber, off after the last


def test_a_subscriber_that_falls_behind_is_dropped_and_may_resume() -> None:
    async def scenario() -> None:
        hub = KvEventHub(lambda wanted: None, max_queued=2)
        stream = hub.subscribe()
        first = asyncio.ensure_future(stream.__anext__())
        while hub.num_subscribers < 1:
            await asyncio.sleep(0)
        for _ in range(4):
            hub.publish([CacheCleared()])
        assert (await first).sequence_number == 1
        assert (await stream.__anext__()).sequence_number == 2  # the third found 2 queued
        with pytest.raises(Overloaded):
            await stream.__anext__()
        assert hub.num_subscribers == 0

    asyncio.run(scenario())


def test_a_subscriber_resumes_from_a_sequence_number_the_hub_still_holds() -> None:
    async def scenario() -> list[int]:
        hub = KvEventHub(lambda wanted: None)
        live = hub.subscribe()
        pending = asyncio.ensure_future(live.__anext__())
        while hub.num_subscribers < 1:
            await asyncio.sleep(0)
        for _ in range(3):
            hub.publish([CacheCleared()])
        await pending
        resumed = hub.subscribe(start_sequence_number=2)
        numbers = [(await resumed.__anext__()).sequence_number for _ in range(2)]
        await resumed.aclose()
        await live.aclose()
        return numbers

    assert asyncio.run(scenario()) == [2, 3]
