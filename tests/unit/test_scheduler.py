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


def test_long_prompt_is_split_across_steps() -> None:
    scheduler = make_scheduler()
    seq = Sequence(0, list(range(40)), SamplingParams())
    scheduler.add(seq)
    sizes = [run_step(scheduler).num_new_tokens for _ in range(3)]
    assert sizes == [[16], [16], [8]]
    assert seq.num_output_tokens == 1


def test_budgets_bound_every_step() -> None:
    scheduler = make_scheduler()
    for i in range(10):
        scheduler.add(Sequence(i, list(range(i, i + 7)), SamplingParams()))
    for _ in range(20):
        batch = run_step(scheduler)
        assert batch.num_batched_tokens <= 16
        assert len(scheduler.running) <= 4


def test_waiting_prompts_do_not_starve_running_decodes() -> None:
    scheduler = make_scheduler(max_num_seqs=8)
    first = Sequence(0, list(range(5)), SamplingParams())
    scheduler.add(first)
    run_step(scheduler)  # prefill: first now decodes
    for i in range(1, 8):
        scheduler.add(Sequence(i, list(range(100, 130)), SamplingParams()))
    for _ in range(5):
        batch = run_step(scheduler)
        assert batch.seqs[0] is first and batch.num_new_tokens[0] == 1


def test_admission_is_first_come_first_served() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [Sequence(i, [i] * 3, SamplingParams()) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    batch = run_step(scheduler)
    assert [s.seq_id for s in batch.seqs] == [0, 1]


def test_full_cache_preempts_the_most_recently_admitted() -> None:
    scheduler = make_scheduler(num_kv_blocks=4, max_num_batched_tokens=16)
    older = Sequence(0, [1] * 4, SamplingParams())
    newer = Sequence(1, [2] * 4, SamplingParams())
    scheduler.add(older)
    scheduler.add(newer)
    run_step(scheduler)  # both prefilled: 2 blocks used, each now needs a second block
    preempted = []
    for _ in range(6):
        preempted += run_step(scheduler).preempted
    assert preempted and preempted[0] is newer
    assert newer.status == SequenceStatus.WAITING or newer.num_preemptions > 0
    assert scheduler.num_preemptions >= 1
    scheduler.block_manager.check_invariants(scheduler.running)


def test_preempted_sequence_releases_its_blocks_and_goes_first() -> None:
    scheduler = make_scheduler(num_kv_blocks=8)
    seqs = [Sequence(i, [i] * 6, SamplingParams()) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler)
    victim = scheduler.running[-1]
    scheduler.preempt(victim)
    assert victim.block_table == [] and scheduler.waiting[0] is victim
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
