"""A pytest plugin: after each test, every in-process engine's KV cache is clean.

For the in-process tests (``LLM``, ``EngineCore``): every EngineCore built during a test is
tracked; after the test, each one with no unfinished request must hold every block free
with a reference count of zero and pass ``BlockManager.check_invariants``. The services tests
check the same over gRPC (tests/service_fixtures.py: ``assert_kv_cache_clean``).
Enable it from tests/conftest.py with ``pytest_plugins = ["tests.kv_invariants"]``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import pytest

from scheduler_service.engine import EngineCore

_ENGINES: weakref.WeakSet[EngineCore] = weakref.WeakSet()  # every engine still alive
_NEW_ENGINES: list[EngineCore] = []  # built during the current test: kept until it is checked


def assert_engine_kv_cache_clean(engine: EngineCore) -> None:
    scheduler = engine.scheduler
    blocks = scheduler.block_manager
    blocks.check_invariants([*scheduler.running, *scheduler.waiting])
    assert blocks.num_free_blocks == blocks.num_blocks, (
        f"{blocks.num_blocks - blocks.num_free_blocks} KV blocks still held with no request"
    )
    assert all(block.ref_count == 0 for block in blocks.blocks)


@pytest.fixture(scope="session", autouse=True)
def track_engines() -> Iterator[None]:
    """Every EngineCore built in this session (module fixtures' too) is tracked, weakly."""
    original_init = EngineCore.__init__

    def tracking_init(self: EngineCore, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]
        _ENGINES.add(self)
        _NEW_ENGINES.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EngineCore, "__init__", tracking_init)
        yield


@pytest.fixture(autouse=True)
def kv_cache_clean_after_each_test(track_engines: None) -> Iterator[None]:
    yield
    engines = {id(e): e for e in [*_ENGINES, *_NEW_ENGINES]}.values()
    _NEW_ENGINES.clear()
    for engine in engines:
        if not engine.has_unfinished:  # a test that stops mid-run owns its state
            assert_engine_kv_cache_clean(engine)
