"""BlockManager: flushing the prefix cache (only while no block is in use) and its KV events.

The events say which hashes a lookup can find: a run of newly committed blocks is one
BlocksStored with its parent's hash, an eviction or a flush is a BlocksRemoved, and nothing is
collected while ``kv_events`` is None. A random workload's events, replayed, equal the set of
hashes ``hash_to_block`` holds.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protos.sampling_params import SamplingParams
from scheduler_service.block_manager import (
    BlockManager,
    BlocksRemoved,
    BlocksStored,
    KvEvent,
    chain_hash,
)
from scheduler_service.engine_commands import AddRequest, FlushCache, apply_commands
from scheduler_service.sequence import Sequence

BLOCK_SIZE = 4


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams())


def run(manager: BlockManager, seq: Sequence) -> None:
    """Allocate, compute every token, commit, free."""
    assert manager.allocate(seq)
    seq.num_computed_tokens = seq.num_tokens
    manager.commit(seq)
    manager.free(seq)


def test_flush_forgets_every_cached_block_so_a_repeat_misses() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    run(manager, make_seq(0, list(range(10))))
    again = make_seq(1, list(range(10)))
    assert manager.allocate(again) and again.num_cached_tokens == 8  # control: it hits
    manager.free(again)
    assert manager.reset_prefix_cache()
    assert manager.hash_to_block == {}
    after = make_seq(2, list(range(10)))
    assert manager.allocate(after) and after.num_cached_tokens == 0
    manager.check_invariants([after])


def test_flush_is_refused_while_a_block_is_in_use_and_changes_nothing() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    run(manager, make_seq(0, list(range(10))))
    running = make_seq(1, [7] * 6)
    assert manager.allocate(running)
    cached = dict(manager.hash_to_block)
    assert not manager.reset_prefix_cache()
    assert manager.hash_to_block == cached and cached
    manager.free(running)
    assert manager.reset_prefix_cache()


def test_committed_blocks_are_stored_in_runs_with_their_parent_hash() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    manager.kv_events = []
    seq = make_seq(0, list(range(13)))
    assert manager.allocate(seq)
    seq.num_computed_tokens = 4
    manager.commit(seq)
    seq.num_computed_tokens = 13
    manager.commit(seq)
    h0 = chain_hash(-1, [0, 1, 2, 3])
    h1 = chain_hash(h0, [4, 5, 6, 7])
    h2 = chain_hash(h1, [8, 9, 10, 11])
    assert manager.kv_events == [
        BlocksStored([h0], [[0, 1, 2, 3]], None),
        BlocksStored([h1, h2], [[4, 5, 6, 7], [8, 9, 10, 11]], h0),
    ]


def test_evictions_and_flushes_are_removed_events_and_hits_store_nothing() -> None:
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    manager.kv_events = []
    run(manager, make_seq(0, list(range(8))))  # stores two blocks
    run(manager, make_seq(1, list(range(8))))  # hits them: nothing new
    stored = manager.kv_events[0]
    assert isinstance(stored, BlocksStored) and len(manager.kv_events) == 1
    run(manager, make_seq(2, [50 + t for t in range(9)]))  # needs all 3 blocks: evicts both
    removed = manager.kv_events[1]  # leaf first: freed blocks go back in reverse
    assert removed == BlocksRemoved(stored.block_hashes[::-1])
    assert manager.reset_prefix_cache()
    last = manager.kv_events[-1]
    assert isinstance(last, BlocksRemoved) and len(last.block_hashes) == 2


def test_nothing_is_collected_while_nobody_subscribes() -> None:
    manager = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    run(manager, make_seq(0, list(range(8))))
    run(manager, make_seq(1, [50 + t for t in range(9)]))
    assert manager.kv_events is None


def replay(events: list[KvEvent]) -> set[int]:
    known: set[int] = set()
    for event in events:
        if isinstance(event, BlocksStored):
            assert not known & set(event.block_hashes), "stored twice without a removal"
            known |= set(event.block_hashes)
        elif isinstance(event, BlocksRemoved):
            assert set(event.block_hashes) <= known, "removed a hash never stored"
            known -= set(event.block_hashes)
    return known


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 14), st.booleans(), st.booleans()),
        min_size=1,
        max_size=40,
    )
)
def test_replayed_events_equal_the_findable_hashes(ops: list[tuple[int, int, bool, bool]]) -> None:
    """Twins (the same prompt allocated twice before either is computed) commit one hash into two
    blocks: it is stored once, and removed once it can no longer be found."""
    manager = BlockManager(num_blocks=12, block_size=BLOCK_SIZE)
    manager.kv_events = []
    for step, (prefix, length, twins, flush) in enumerate(ops):
        tokens = [prefix] * 2 + list(range(length))
        seqs = [make_seq(2 * step + i, tokens) for i in range(2 if twins else 1)]
        allocated = [seq for seq in seqs if manager.allocate(seq)]
        for seq in allocated:
            seq.num_computed_tokens = seq.num_tokens
            manager.commit(seq)
        for seq in allocated:
            manager.free(seq)
        if flush:
            assert manager.reset_prefix_cache()
        assert replay(manager.kv_events) == set(manager.hash_to_block)


def test_a_flush_command_answers_with_its_id_and_outcome(tiny_model_dir) -> None:
    from nanoserve import LLM

    llm = LLM(str(tiny_model_dir), device="cpu", block_size=16, num_kv_blocks=64)
    engine = llm.engine
    applied = apply_commands(engine, [FlushCache(7)])
    assert applied.flushed == [(7, True)]
    params = SamplingParams(max_tokens=4)
    apply_commands(engine, [AddRequest("r", list(range(40)), params)])
    engine.step()  # the request now holds blocks
    assert apply_commands(engine, [FlushCache(8)]).flushed == [(8, False)]
