"""BlockManager: reference counts, the free list and prefix caching stay consistent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protos.sampling_params import SamplingParams
from scheduler_service.block_manager import BlockManager, chain_hash
from scheduler_service.sequence import Sequence

BLOCK_SIZE = 4


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams())


def compute_all(manager: BlockManager, seq: Sequence) -> None:
    seq.num_computed_tokens = seq.num_tokens
    manager.commit(seq)


def test_chain_hash_depends_on_previous_block() -> None:
    assert chain_hash(1, [1, 2, 3]) != chain_hash(2, [1, 2, 3])
    assert chain_hash(1, [1, 2, 3]) == chain_hash(1, [1, 2, 3])


def test_second_sequence_with_same_prefix_hits_the_cache() -> None:
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = make_seq(0, list(range(10)))
    assert manager.allocate(first)
    compute_all(manager, first)
    second = make_seq(1, list(range(9)) + [99])
    assert manager.allocate(second)
    assert second.num_cached_tokens == 8  # two full shared blocks
    assert second.block_table[:2] == first.block_table[:2]
    assert manager.blocks[first.block_table[0]].ref_count == 2
    manager.check_invariants([first, second])


def test_uncomputed_blocks_are_not_hit() -> None:
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = make_seq(0, list(range(12)))
    assert manager.allocate(first)  # not computed yet: nothing registered
    second = make_seq(1, list(range(12)))
    assert manager.allocate(second)
    assert second.num_cached_tokens == 0
    assert set(second.block_table).isdisjoint(first.block_table)
    compute_all(manager, first)  # now the same prompt hits
    third = make_seq(2, list(range(12)))
    assert manager.allocate(third)
    assert third.num_cached_tokens == 11 and third.block_table == first.block_table


def test_whole_prompt_hit_still_computes_the_last_token() -> None:
    manager = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = make_seq(0, list(range(8)))
    assert manager.allocate(first)
    compute_all(manager, first)
    second = make_seq(1, list(range(8)))
    assert manager.allocate(second)
    assert second.num_cached_tokens == 7
    assert second.num_uncomputed_tokens == 1


def test_freed_block_keeps_its_contents_until_handed_out_again() -> None:
    manager = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = make_seq(0, list(range(8)))
    assert manager.allocate(first)
    compute_all(manager, first)
    manager.free(first)
    again = make_seq(1, list(range(8)) + [5])
    assert manager.allocate(again)
    assert again.num_cached_tokens == 8
    manager.free(again)
    other = make_seq(2, [7] * 16)  # needs all 4 blocks: evicts the cached ones
    assert manager.allocate(other)
    manager.free(other)
    late = make_seq(3, list(range(8)) + [5])
    assert manager.allocate(late)
    assert late.num_cached_tokens == 0
    manager.check_invariants([late])


def test_hash_collision_is_not_used_as_a_hit() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_seq(0, [1, 2, 3, 4, 5])
    assert manager.allocate(first)
    compute_all(manager, first)
    control = make_seq(1, [1, 2, 3, 4, 6])
    assert manager.allocate(control)
    assert control.num_cached_tokens == 4  # the same lookup hits while the tokens agree
    block = manager.blocks[first.block_table[0]]
    block.token_ids = [9, 9, 9, 9]  # as if another prefix had produced the same hash
    second = make_seq(2, [1, 2, 3, 4, 6])
    assert manager.allocate(second)
    assert second.num_cached_tokens == 0
    assert first.block_table[0] not in second.block_table


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    manager = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    seq = make_seq(0, list(range(12)))
    assert not manager.allocate(seq)
    assert seq.block_table == [] and manager.num_free_blocks == 2
    fits = make_seq(1, list(range(8)))  # exactly the 2 blocks there are
    assert manager.allocate(fits)
    assert len(fits.block_table) == 2 and manager.num_free_blocks == 0
    assert not manager.ensure_slots(fits, 9)  # growing past the cache changes nothing either
    assert len(fits.block_table) == 2


operations = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "append", "free", "preempt", "compute"]),
        st.integers(0, 7),
        st.lists(st.integers(0, 3), min_size=1, max_size=14),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.booleans())
def test_random_workload_keeps_refcounts_and_free_list_consistent(ops, prefix_caching) -> None:
    manager = BlockManager(
        num_blocks=12, block_size=BLOCK_SIZE, enable_prefix_caching=prefix_caching
    )
    live: dict[int, Sequence] = {}
    next_id = 0
    for op, index, tokens in ops:
        seqs = list(live.values())
        target = seqs[index % len(seqs)] if seqs else None
        if op == "allocate":
            seq = make_seq(next_id, tokens)
            next_id += 1
            if manager.allocate(seq):
                live[seq.seq_id] = seq
        elif target is None:
            continue
        elif op == "append":
            target.token_ids.append(tokens[0])
            manager.ensure_slots(target, target.num_tokens)
        elif op == "compute":
            target.num_computed_tokens = min(
                target.num_tokens, len(target.block_table) * BLOCK_SIZE
            )
            manager.commit(target)
        elif op in ("free", "preempt"):
            manager.free(target)
            del live[target.seq_id]
            if op == "free":
                manager.forget(target)
        manager.check_invariants(list(live.values()))
    for seq in live.values():
        manager.free(seq)
    manager.check_invariants([])
    assert manager.num_free_blocks == manager.num_blocks
    assert all(block.ref_count == 0 for block in manager.blocks)
