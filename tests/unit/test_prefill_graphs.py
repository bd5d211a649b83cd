"""Prefill graphs (worker_service/prefill_graphs.py) on the CPU: which steps they take, how a
step is padded into their static inputs, and that the padded step they would capture gives the
eager step's logits, stores exactly the step's K/V and leaves ``prev_tokens`` alone; and that
both kinds' inputs live in the one buffer the host's copy fills. The capture and replay themselves
need CUDA (tests/gpu/test_gpu_engine.py: graphs == eager)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protos.sampling_params import SamplingParams
from protos.step_plan import NewSequence, StepPlan
from worker_service.batch_inputs import build_host_step, named
from worker_service.config import WorkerConfig
from worker_service.cuda_graphs import MAX_BANNED_IDS
from worker_service.decode_graphs import DecodeGraphs
from worker_service.prefill_graphs import (
    PrefillGraphs,
    prefill_graph_kinds,
    token_buckets,
    wide_token_buckets,
)
from worker_service.sampling import build_sampling_input
from worker_service.sequence_table import SequenceTable
from worker_service.worker import Worker

BLOCK = 16
CPU = torch.device("cpu")
PLAIN = SamplingParams()


def _step(table: SequenceTable, shape: list[tuple[int, int, int]], params=PLAIN):
    """One step of sequences given as (prompt length, cached tokens, tokens this step)."""
    news = [
        NewSequence(i, [3 + i + t for t in range(n)], params, [2 * i, 2 * i + 1], cached)
        for i, (n, cached, _) in enumerate(shape)
    ]
    ids = [n.seq_id for n in news]
    plan = StepPlan(0, news, [], [], [], [], [], ids, [c for _, _, c in shape])
    seqs = table.apply(plan)
    host = build_host_step(seqs, [c for _, _, c in shape], table, BLOCK, {})
    sampling = build_sampling_input(
        [seqs[r] for r in host.sample_rows], 256, (1,), np.random.default_rng(0)
    )
    return host, sampling


# A new 7-token prompt (samples), a 5-token chunk of a 12-token prompt (does not), a row with
# 9 cached tokens and its last one to compute (samples): 13 tokens.
MIXED = [(7, 0, 7), (12, 0, 5), (10, 9, 1)]


def test_steps_go_to_the_smallest_bucket_that_holds_their_tokens() -> None:
    assert token_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert token_buckets(1000) == [16, 32, 64, 128, 256, 512, 1000]
    assert token_buckets(100) == [16, 32, 64, 100]
    graphs = PrefillGraphs(None, 4, token_buckets(64), 2, torch.zeros(64, dtype=torch.int64), CPU)
    host, sampling = _step(SequenceTable(rows=8, blocks_per_seq=2), MIXED)
    assert graphs.fitting_bucket(host, sampling) == 16
    host, sampling = _step(SequenceTable(rows=8, blocks_per_seq=2), [(20, 0, 20), (4, 0, 4)])
    assert graphs.bucket(host) == 32
    decode, _ = _step(SequenceTable(rows=8, blocks_per_seq=2), [(5, 4, 1), (3, 2, 1)])
    assert decode.is_decode and graphs.bucket(decode) is None  # the decode graphs' step
    too_many, _ = _step(SequenceTable(rows=8, blocks_per_seq=2), [(2, 0, 2)] * 5)
    assert graphs.bucket(too_many) is None  # 5 sequences, 4 rows
    too_long, _ = _step(SequenceTable(rows=8, blocks_per_seq=2), [(30, 0, 30)] * 3)
    assert graphs.bucket(too_long) is None  # 90 tokens, 64 at most
    banning = SamplingParams(min_tokens=1, stop_token_ids=tuple(range(10, 10 + MAX_BANNED_IDS)))
    host, sampling = _step(SequenceTable(rows=8, blocks_per_seq=2), MIXED, banning)
    assert graphs.fitting_bucket(host, sampling) is None


def test_a_step_takes_the_narrowest_kind_that_holds_it() -> None:
    assert wide_token_buckets(8192) == [128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192]
    assert wide_token_buckets(5000) == [128, 256, 512, 1024, 2048, 3072, 4096, 5000]
    assert wide_token_buckets(300) == [128, 256, 300]
    prev = torch.zeros(64, dtype=torch.int64)
    narrow, wide = prefill_graph_kinds(None, 24, 512, 2, prev, CPU)
    assert (narrow.kind, narrow.rows, narrow.buckets[-1]) == ("prefill", 16, 512)
    assert (wide.kind, wide.rows, wide.buckets) == ("wide prefill", 24, [128, 256, 512])

    def first_fitting(shape: list[tuple[int, int, int]]) -> tuple[str, int] | None:
        host, sampling = _step(SequenceTable(rows=32, blocks_per_seq=2), shape)
        for kind in (narrow, wide):  # the runner's order
            bucket = kind.fitting_bucket(host, sampling)
            if bucket is not None:
                return kind.kind, bucket
        return None

    assert first_fitting(MIXED) == ("prefill", 16)
    assert first_fitting([(30, 0, 30)] * 16) == ("prefill", 512)  # 480 tokens in 16 rows
    assert first_fitting([(30, 0, 30)] * 2 + [(9, 8, 1)] * 15) == ("wide prefill", 128)  # 17 rows
    assert first_fitting([(30, 0, 30)] * 17) == ("wide prefill", 512)
    assert first_fitting([(30, 0, 30)] * 20) is None  # 600 tokens
    assert first_fitting([(2, 0, 2)] * 25) is None  # 25 rows
    # Steps of more tokens than a narrow graph's take a wide one, however few their rows;
    # with no more rows or tokens than a narrow graph holds there is no wide kind.
    kinds = prefill_graph_kinds(None, 16, 2048, 2, prev, CPU)
    assert [(k.kind, k.rows, k.buckets[-1]) for k in kinds] == [
        ("prefill", 16, 512),
        ("wide prefill", 16, 2048),
    ]
    assert [k.kind for k in prefill_graph_kinds(None, 16, 512, 2, prev, CPU)] == ["prefill"]
    assert [k.kind for k in prefill_graph_kinds(None, 4, 64, 2, prev, CPU)] == ["prefill"]


def test_a_negative_prefill_graph_size_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="max_prefill_graph_tokens=-1"):
        WorkerConfig("m", max_prefill_graph_tokens=-1)


def test_a_mixed_step_loads_with_padded_tokens_and_rows_that_write_nowhere() -> None:
    graphs = PrefillGraphs(None, 4, token_buckets(64), 2, torch.zeros(64, dtype=torch.int64), CPU)
    graphs.load(*_step(SequenceTable(rows=8, blocks_per_seq=2), [(30, 0, 30)] * 2))  # stale
    host, sampling = _step(SequenceTable(rows=8, blocks_per_seq=2), MIXED)
    graphs.load(host, sampling)
    x, a = graphs.inputs_gpu, host.arrays
    for name in ("input_ids", "prev_rows", "positions", "slot_mapping", "seq_lens"):
        n = len(getattr(a, name))
        assert getattr(x, name)[:n].tolist() == getattr(a, name).tolist(), name
    assert x.slot_mapping[13:].eq(-1).all() and x.prev_rows[13:].eq(-1).all()
    assert x.cu_seqlens_q.tolist() == [0, 7, 12, 13, 13]  # the padded row has no query token
    assert x.last_token_indices.tolist() == [6, 12, 0, 0]  # two sampling rows, then padding
    assert x.block_tables[:3].tolist() == a.block_tables.tolist() and x.block_tables[3, 0] == 0
    assert graphs.sampling_gpu.temperatures.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_every_graph_input_is_in_the_buffer_the_hosts_copy_fills() -> None:
    # The kernels read positions, slots, lengths, block tables and ids before their PDL wait
    # (kernels/pdl.py): safe only while no kernel of the step writes them, i.e. while the step's
    # one host-to-device copy is all that does.
    prev = torch.zeros(64, dtype=torch.int64)
    for graphs in (
        PrefillGraphs(None, 4, token_buckets(64), 2, prev, CPU),
        DecodeGraphs(None, 4, 2, prev, CPU),
    ):
        start = graphs.static.data_ptr()
        views = named(graphs.inputs_gpu) | named(graphs.sampling_gpu)
        for name, view in views.items():
            end = view.data_ptr() + view.numel() * view.element_size()
            assert start <= view.data_ptr() and end <= start + graphs.static.numel(), name


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    config = WorkerConfig(
        str(tiny_model_dir), attention_backend="triton", block_size=BLOCK, num_kv_blocks=8,
        max_num_seqs=4, max_num_batched_tokens=64,
    )  # fmt: skip
    return Worker(config)


@torch.inference_mode()
def test_the_padded_step_gives_the_eager_logits_and_stores_only_its_own_kv(worker) -> None:
    torch.manual_seed(0)
    worker.kv_cache.copy_(torch.randn_like(worker.kv_cache))  # row 2's cached context, and junk
    before = worker.kv_cache.clone()
    runner = worker.runner
    host, sampling = _step(SequenceTable(rows=8, blocks_per_seq=2), MIXED)
    sampling.arrays.temperatures[:] = 0.0  # greedy
    eager_logits, _ = runner._run_eager(host, sampling)
    eager_cache = worker.kv_cache.clone()
    written = torch.zeros(8 * BLOCK, dtype=torch.bool)
    written[torch.from_numpy(host.arrays.slot_mapping)] = True
    written = written.view(8, BLOCK)
    assert not torch.equal(eager_cache[:, :, written], before[:, :, written])

    worker.kv_cache.copy_(before)
    runner.prev_tokens[:] = torch.arange(len(runner.prev_tokens))
    graphs = PrefillGraphs(worker.model, 4, token_buckets(64), 2, runner.prev_tokens, CPU)
    graphs.prepare_capture()
    graphs.load(host, sampling)
    logits = graphs._step(graphs.bucket(host))
    torch.testing.assert_close(logits[:2], eager_logits, rtol=1e-5, atol=1e-5)
    assert graphs.sampled[:2].tolist() == eager_logits.argmax(-1).tolist()
    assert torch.equal(worker.kv_cache[:, :, ~written], before[:, :, ~written])  # padding: none
    torch.testing.assert_close(worker.kv_cache, eager_cache, rtol=1e-5, atol=1e-5)
    assert runner.prev_tokens.tolist() == list(range(len(runner.prev_tokens)))
    assert set(named(graphs.inputs_gpu)) == set(named(host.arrays))
