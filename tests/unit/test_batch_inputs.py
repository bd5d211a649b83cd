"""The worker's step inputs: packed arrays, block tables in one array, the arrays of a step
checked against a per-token loop that says the same thing the slow way, and a decode step loaded
into the CUDA graphs' padded static inputs (here on CPU: no graph is captured or replayed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protos.sampling_params import SamplingParams
from protos.step_plan import PENDING, NewSequence, StepPlan
from worker_service.batch_inputs import (
    ALIGN,
    Layout,
    StepArrays,
    build_host_step,
    named,
    pack,
    pack_step,
)
from worker_service.cuda_graphs import MAX_BANNED_IDS
from worker_service.decode_graphs import DecodeGraphs
from worker_service.sampling import SamplingArrays, build_sampling_input
from worker_service.sequence_table import SequenceTable

BLOCK = 4


def test_pack_round_trips_every_array_at_aligned_offsets() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.integers(-5, 5, size=7, dtype=np.int64),
        "b": rng.integers(0, 9, size=(3, 5), dtype=np.int32),
        "c": rng.random(3, dtype=np.float32),
        "d": np.zeros(0, dtype=np.int64),
        "e": np.arange(1, dtype=np.int32),
    }
    out = pack(arrays, torch.device("cpu"))
    for name, array in arrays.items():
        assert out[name].dtype == torch.from_numpy(array).dtype
        assert np.array_equal(out[name].numpy(), array), name
        assert out[name].data_ptr() % 16 == 0  # Triton's pointer specialization stays the same
    layout = Layout.of(arrays)
    assert all(offset % ALIGN == 0 for offset in layout.offsets.values())


def test_a_step_and_its_sampling_rows_pack_into_one_buffer_by_name() -> None:
    rng = np.random.default_rng(2)
    ints = lambda *shape: rng.integers(-9, 9, size=shape, dtype=np.int64)  # noqa: E731
    step = StepArrays(
        input_ids=ints(5),
        prev_rows=ints(5),
        positions=ints(5),
        slot_mapping=ints(5),
        seq_lens=ints(3).astype(np.int32),
        cu_seqlens_q=ints(4).astype(np.int32),
        block_tables=ints(3, 2).astype(np.int32),
        last_token_indices=ints(2),
    )
    sampling = SamplingArrays(
        temperatures=rng.random(2, dtype=np.float32),
        seeds=ints(2),
        top_ks=ints(2),
        top_ps=rng.random(2, dtype=np.float32),
        min_ps=rng.random(2, dtype=np.float32),
        banned_ids=ints(2, 3),
    )
    step_dev, sampling_dev = pack_step(step, sampling, torch.device("cpu"))
    base = step_dev.input_ids.untyped_storage().data_ptr()
    for host, dev in [(step, step_dev), (sampling, sampling_dev)]:
        for name, array in named(host).items():
            view = getattr(dev, name)
            assert view.dtype == torch.from_numpy(array).dtype, name
            assert np.array_equal(view.numpy(), array), name
            assert view.untyped_storage().data_ptr() == base, name  # one buffer: one copy
            assert (view.data_ptr() - base) % ALIGN == 0, name


def _plan(step_id: int, new=(), appended=(), finished=(), preempted=(), resumed=(), seq_ids=()):
    return StepPlan(
        step_id=step_id,
        new_seqs=list(new),
        resumed_seqs=list(resumed),
        appended_seq_ids=[s for s, _ in appended],
        appended_block_ids=[b for _, b in appended],
        finished_seq_ids=list(finished),
        preempted_seq_ids=list(preempted),
        seq_ids=list(seq_ids),
        num_new_tokens=[1] * len(seq_ids),
    )


def _new(seq_id: int, prompt: list[int], blocks: list[int]) -> NewSequence:
    return NewSequence(seq_id, prompt, SamplingParams(), blocks, 0)


def test_sequence_table_grows_and_reuses_rows() -> None:
    table = SequenceTable(rows=2, blocks_per_seq=2)
    seqs = table.apply(_plan(0, new=[_new(i, [1, 2], [10 * i, 10 * i + 1]) for i in range(3)]))
    assert seqs == [] and table.block_tables.shape[0] >= 3  # a third row made room
    table.apply(_plan(1, appended=[(0, [7, 8, 9])]))  # past the width: columns grow
    assert table.block_table(table.seqs[0]) == [0, 1, 7, 8, 9]
    assert table.block_table(table.seqs[2]) == [20, 21]
    row_of_1 = table.seqs[1].row
    table.apply(_plan(2, finished=[1], new=[_new(5, [3], [4])]))
    assert table.seqs[5].row == row_of_1 and table.block_table(table.seqs[5]) == [4]
    table.apply(_plan(3, preempted=[2]))
    assert table.block_table(table.seqs[2]) == []


def _reference(seqs, counts, table, prev_rows):
    """Token by token, the obvious way."""
    ids, prev, positions, slots, last = [], [], [], [], []
    for seq, n in zip(seqs, counts):
        blocks = table.block_table(seq)
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            token = seq.token_ids[pos]
            pending = token == PENDING
            ids.append(0 if pending else token)
            prev.append(prev_rows[seq.seq_id] if pending else -1)
            positions.append(pos)
            slots.append(blocks[pos // BLOCK] * BLOCK + pos % BLOCK)
        if seq.num_computed_tokens + n == len(seq.token_ids):
            last.append(len(ids) - 1)
    return ids, prev, positions, slots, last


@pytest.mark.parametrize("decode", [True, False])
def test_step_arrays_match_a_per_token_loop(decode) -> None:
    rng = np.random.default_rng(1)
    table = SequenceTable(rows=4, blocks_per_seq=2)
    news = []
    for seq_id in range(6):
        length = int(rng.integers(1, 15))
        blocks = rng.permutation(100)[: -(-(length + 1) // BLOCK)].tolist()
        news.append(_new(seq_id, rng.integers(1, 50, size=length).tolist(), blocks))
    seqs = table.apply(_plan(0, new=news, seq_ids=range(6)))
    prev_rows = {}
    counts = []
    for i, seq in enumerate(seqs):
        if i % 2 == 0:  # its prompt is done and its last token is still on the device
            seq.token_ids.append(PENDING)
            prev_rows[seq.seq_id] = 5 - i
            seq.num_computed_tokens = len(seq.token_ids) - 1
        elif not decode:
            seq.num_computed_tokens = int(rng.integers(0, len(seq.token_ids)))
        else:
            seq.num_computed_tokens = len(seq.token_ids) - 1
        remaining = len(seq.token_ids) - seq.num_computed_tokens
        counts.append(1 if decode else int(rng.integers(1, remaining + 1)))
    step = build_host_step(seqs, counts, table, BLOCK, prev_rows)
    ids, prev, positions, slots, last = _reference(seqs, counts, table, prev_rows)
    a = step.arrays
    assert a.input_ids.tolist() == ids and a.prev_rows.tolist() == prev
    assert a.positions.tolist() == positions and a.slot_mapping.tolist() == slots
    assert a.last_token_indices.tolist() == last
    ends = [s.num_computed_tokens + n for s, n in zip(seqs, counts)]
    assert a.seq_lens.tolist() == ends and a.cu_seqlens_q.tolist()[-1] == sum(counts)
    assert step.is_decode == decode and step.num_pending == sum(p >= 0 for p in prev)


def _decode_step(num_seqs: int, table: SequenceTable, params: list[SamplingParams]):
    """A decode step of ``num_seqs`` new sequences (each computes its last prompt token)."""
    base = 10 * len(table)
    news = [
        NewSequence(base + i, [5 + i] * (3 + i), params[i], [base + i, 40 + base + i], 0)
        for i in range(num_seqs)
    ]
    seqs = table.apply(_plan(len(table), new=news, seq_ids=[n.seq_id for n in news]))
    for seq in seqs:
        seq.num_computed_tokens = len(seq.token_ids) - 1
    step = build_host_step(seqs, [1] * num_seqs, table, BLOCK, {})
    return step, build_sampling_input(seqs, 50, (1,), np.random.default_rng(0))


def _leading(view: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """The corner of a padded view that holds ``like``."""
    return view.numpy()[tuple(slice(0, size) for size in like.shape)]


def test_a_decode_step_loads_into_the_graph_inputs_with_padded_rows() -> None:
    graphs = DecodeGraphs(None, 8, 4, torch.zeros(8, dtype=torch.int64), torch.device("cpu"))
    table = SequenceTable(rows=8, blocks_per_seq=2)
    banning = SamplingParams(temperature=0.5, top_k=3, min_tokens=2, stop_token_ids=(7, 9))
    graphs.load(*_decode_step(5, table, [banning] * 5))  # a larger step first: stale rows
    step, sampling = _decode_step(3, table, [SamplingParams(), banning, SamplingParams(seed=3)])
    assert graphs.fitting_bucket(step, sampling) is not None
    graphs.load(step, sampling)
    x, s = graphs.inputs_gpu, graphs.sampling_gpu
    for name, array in named(step.arrays).items():
        assert np.array_equal(_leading(getattr(x, name), array), array), name
    assert x.slot_mapping[3:].eq(-1).all() and x.prev_rows[3:].eq(-1).all()
    assert x.seq_lens[3:].eq(1).all() and x.block_tables[3:].eq(0).all()
    assert x.cu_seqlens_q.tolist() == list(range(9))  # one token per row, padded rows too
    for name, array in named(sampling.arrays).items():
        assert np.array_equal(_leading(getattr(s, name), array), array), name
    assert s.temperatures[3:].eq(0).all()  # padded rows are greedy
    assert s.banned_ids[:, 3:].eq(-1).all() and s.banned_ids[3:].eq(-1).all()
    assert s.banned_ids[1, :3].tolist() == [1, 7, 9]


def test_steps_the_graphs_cannot_hold_run_eagerly() -> None:
    graphs = DecodeGraphs(None, 8, 4, torch.zeros(8, dtype=torch.int64), torch.device("cpu"))
    many_stops = SamplingParams(min_tokens=1, stop_token_ids=tuple(range(10, 10 + MAX_BANNED_IDS)))
    step, sampling = _decode_step(2, SequenceTable(rows=8, blocks_per_seq=2), [many_stops] * 2)
    assert sampling.arrays.banned_ids.shape[1] > MAX_BANNED_IDS
    assert graphs.fitting_bucket(step, sampling) is None
    step, sampling = _decode_step(
        2, SequenceTable(rows=8, blocks_per_seq=2), [SamplingParams()] * 2
    )
    assert graphs.fitting_bucket(step, sampling) is not None
    too_many = DecodeGraphs(None, 1, 4, torch.zeros(8, dtype=torch.int64), torch.device("cpu"))
    assert too_many.fitting_bucket(step, sampling) is None


def test_a_decode_step_runs_its_rows_longest_context_first(tiny_model_dir) -> None:
    """The decode attention starts its programs in row order: the longest context goes first.
    A step with prompt tokens keeps the plan's order; each token reaches its own sequence."""
    from worker_service.config import WorkerConfig
    from worker_service.worker import Worker

    worker = Worker(WorkerConfig(model_dir=str(tiny_model_dir), device="cpu"))
    prompts = {0: [5, 6, 7], 1: list(range(10, 19)), 2: [30, 31, 32, 33, 34]}
    news = [_new(i, p, [i]) for i, p in prompts.items()]
    prefill = _plan(0, new=news, seq_ids=prompts)
    prefill.num_new_tokens = [len(p) for p in prompts.values()]
    first = worker.step(prefill)
    assert first.seq_ids == [0, 1, 2]
    decode = worker.step(_plan(1, seq_ids=[0, 1, 2]))
    assert decode.seq_ids == [1, 2, 0]
    for seq_id, token in zip(decode.seq_ids, decode.token_ids):
        assert worker.seqs.seqs[seq_id].token_ids[-1] == token
