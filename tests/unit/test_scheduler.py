"""Scheduler policy: budgets, chunked prefill, decode first, preemption of the newest admission."""

from __future__ import annotations

from protos.sampling_params import SamplingParams
from scheduler_service.scheduler import Scheduler, SchedulerConfig
from scheduler_service.sequence import Sequence, SequenceStatus


def make_scheduler(**overrides) -> Scheduler:
    config = dict(max_num_seqs=4, max_num_batched_tokens=16, block_size=4, num_kv_blocks=32)
    config.update(overrides)
    return Scheduler(SchedulerConfig(**config))


def run_step(scheduler: Scheduler, next_token: int = 1):
    """Schedule, pretend the worker ran, and append a token to sequences that reached their end."""
    batch = scheduler.schedule()
    scheduler.on_step_launched(batch)
    for seq in batch.seqs:
        if seq.pending_positions:
            scheduler.on_token(seq, next_token)
    return batch


def finish_completed(scheduler: Scheduler, batch) -> None:
    """Retire the batch's sequences that have all their tokens, as the engine does."""
    for seq in batch.seqs:
        if seq.num_output_tokens >= seq.params.max_tokens:
            scheduler.finish(seq)


def test_long_prompt_is_split_across_steps() -> None:
    scheduler = make_scheduler()
    seq = Sequence(0, list(range(40)), SamplingParams())
    scheduler.add(seq)
    sizes = [run_step(scheduler).num_new_tokens for _ in range(3)]
    assert sizes == [[16], [16], [8]]
    assert seq.num_output_tokens == 1


def test_each_step_fills_the_token_budget_or_the_sequence_budget() -> None:
    scheduler = make_scheduler()  # max_num_seqs=4, max_num_batched_tokens=16
    for i in range(10):
        scheduler.add(Sequence(i, list(range(10 * i, 10 * i + 7)), SamplingParams(max_tokens=3)))
    steps = []
    while scheduler.num_unfinished and len(steps) < 20:
        num_waiting = len(scheduler.waiting)
        batch = run_step(scheduler)
        steps.append((batch.num_batched_tokens, len(batch.seqs)))
        assert batch.num_batched_tokens <= 16 and len(batch.seqs) <= 4
        if num_waiting:  # work was left over: one of the two budgets must be used up
            assert batch.num_batched_tokens == 16 or len(batch.seqs) == 4
        finish_completed(scheduler, batch)
    # Step 0: 7 + 7 + 2 (a chunk) tokens, the token budget binds. Step 1: two decodes, the chunk's
    # 5 remaining tokens and a fourth prompt: the sequence budget binds at 14 tokens.
    assert steps[:2] == [(16, 3), (14, 4)]
    assert len(steps) == 9 and sum(n for n, _ in steps) == 10 * (7 + 2)  # prompts, then 2 decodes


def test_waiting_prompts_do_not_starve_running_decodes() -> None:
    scheduler = make_scheduler(max_num_seqs=8)
    first = Sequence(0, list(range(5)), SamplingParams())
    scheduler.add(first)
    run_step(scheduler)  # prefill: first now decodes
    for i in range(1, 8):
        scheduler.add(Sequence(i, list(range(100, 130)), SamplingParams()))
    batches = [run_step(scheduler) for _ in range(5)]
    assert all(batch.seqs[0] is first and batch.num_new_tokens[0] == 1 for batch in batches)
    assert batches[0].num_new_tokens == [1, 15]  # a prompt's chunk takes the rest of the budget


def test_admission_is_first_come_first_served() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [Sequence(i, [i] * 3, SamplingParams()) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    batch = run_step(scheduler)
    assert [s.seq_id for s in batch.seqs] == [0, 1]


def test_full_cache_preempts_the_most_recently_admitted() -> None:
    scheduler = make_scheduler(num_kv_blocks=4)
    older = Sequence(0, [1] * 4, SamplingParams())
    newer = Sequence(1, [2] * 4, SamplingParams())
    scheduler.add(older)
    scheduler.add(newer)
    # Prefill (1 block each), then 4 decodes fill a second block each: all 4 blocks are in use.
    assert [run_step(scheduler).preempted for _ in range(5)] == [[]] * 5
    batch = run_step(scheduler)  # both need a third block; the newer one gives up its two
    assert batch.preempted == [newer] and batch.seqs == [older]
    assert newer.status == SequenceStatus.WAITING and newer.block_table == []
    assert len(older.block_table) == 3 and scheduler.block_manager.num_free_blocks == 1
    assert scheduler.num_preemptions == 1 and newer.num_preemptions == 1
    scheduler.block_manager.check_invariants(scheduler.running)
    scheduler.finish(older)
    batch = run_step(scheduler)  # recomputed: everything but its cached first block
    assert batch.seqs == [newer] and newer.num_cached_tokens == 4
    assert batch.num_new_tokens == [9 - 4]  # 4 prompt and 5 output tokens, less the cached block


def test_no_sequence_is_admitted_in_a_step_that_preempted() -> None:
    # Every token is 1, so the blocks of the preempted and the waiting sequence would be prefix
    # hits on the blocks the surviving sequence holds: without the rule both would be admitted in
    # the very step that preempted one of them, for no free block at all.
    scheduler = make_scheduler(num_kv_blocks=3)
    survivor, victim, waiting = (
        Sequence(i, [1] * n, SamplingParams()) for i, n in enumerate([8, 3, 4])
    )
    for seq in (survivor, victim, waiting):
        scheduler.add(seq)
    first = run_step(scheduler)  # 2 blocks + 1 block: the cache is full, the third one waits
    assert first.seqs == [survivor, victim] and first.num_new_tokens == [8, 3]
    batch = run_step(scheduler)  # the survivor's 9th token needs a third block: the victim's
    assert batch.preempted == [victim]
    assert batch.seqs == [survivor] and batch.num_new_tokens == [1]
    assert list(scheduler.waiting) == [victim, waiting]
    batch = run_step(scheduler)  # the next step admits both, through prefix-cache hits
    assert batch.seqs == [survivor, victim, waiting] and batch.num_new_tokens == [1, 1, 1]


def test_preempted_sequence_releases_its_blocks_and_goes_first() -> None:
    scheduler = make_scheduler(num_kv_blocks=8)
    seqs = [Sequence(i, [i] * 6, SamplingParams()) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler)
    victim = scheduler.running[-1]
    num_free = scheduler.block_manager.num_free_blocks
    num_victim_blocks = len(victim.block_table)
    scheduler.preempt(victim)
    assert victim.block_table == [] and victim.num_computed_tokens == 0
    assert num_victim_blocks == 2  # a 6-token prompt in blocks of 4
    assert scheduler.block_manager.num_free_blocks == num_free + num_victim_blocks
    assert victim.status == SequenceStatus.WAITING and victim not in scheduler.running
    assert scheduler.waiting[0] is victim
    scheduler.block_manager.check_invariants(scheduler.running)


def test_finishing_every_sequence_frees_every_block() -> None:
    scheduler = make_scheduler(num_kv_blocks=6)
    seqs = [Sequence(i, list(range(i, i + 9)), SamplingParams()) for i in range(6)]
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(40):
        batch = run_step(scheduler)
        for seq in list(batch.seqs):
            if seq.num_output_tokens >= 5:
                scheduler.finish(seq)
        if not scheduler.num_unfinished:
            break
    assert not scheduler.num_unfinished
    assert scheduler.block_manager.num_free_blocks == 6
