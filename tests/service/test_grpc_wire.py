"""The internal step protocol survives the wire: StepPlan and StepResult round-trip through bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protos import wire_worker
from protos.sampling_params import SamplingParams
from protos.step_plan import NewSequence, ResumedSequence, StepPlan, StepResult
from tests.service_fixtures import ensure_stubs

ensure_stubs()
from protos.nanoserve.worker.v1 import worker_pb2 as pb  # noqa: E402

ids = st.lists(st.integers(0, 2**31 - 1), max_size=20)
seq_ids = st.integers(0, 2**40)
params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    top_p=st.sampled_from([1.0, 0.9]),
    top_k=st.sampled_from([-1, 1, 50]),
    min_p=st.sampled_from([0.0, 0.05]),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    max_tokens=st.integers(1, 4096),
    min_tokens=st.integers(0, 4),
    ignore_eos=st.booleans(),
    stop_token_ids=st.lists(st.integers(0, 150_000), max_size=3).map(tuple),
    logprobs=st.integers(0, 20),
)
new_seqs = st.builds(NewSequence, seq_ids, ids.filter(bool), params, ids, st.integers(0, 1000))
resumed_seqs = st.builds(ResumedSequence, seq_ids, ids, st.integers(0, 1000))


@st.composite
def plans(draw: st.DrawFn) -> StepPlan:
    appended = draw(st.lists(st.tuples(seq_ids, ids), max_size=5))
    scheduled = draw(st.lists(st.tuples(seq_ids, st.integers(1, 8192)), max_size=10))
    return StepPlan(
        step_id=draw(st.integers(0, 2**40)),
        new_seqs=draw(st.lists(new_seqs, max_size=3)),
        resumed_seqs=draw(st.lists(resumed_seqs, max_size=3)),
        appended_seq_ids=[s for s, _ in appended],
        appended_block_ids=[b for _, b in appended],
        preempted_seq_ids=draw(st.lists(seq_ids, max_size=3)),
        finished_seq_ids=draw(st.lists(seq_ids, max_size=3)),
        seq_ids=[s for s, _ in scheduled],
        num_new_tokens=[n for _, n in scheduled],
        defer_result=draw(st.booleans()),
    )


@given(plans(), st.integers(1, 2**63 - 1))
def test_a_step_plan_round_trips_through_bytes(plan: StepPlan, session_id: int) -> None:
    data = wire_worker.plan_to_pb(plan, session_id).SerializeToString()
    msg = pb.StepRequest.FromString(data)
    assert msg.session_id == session_id
    assert wire_worker.plan_from_pb(msg) == plan


logprob_rows = st.lists(
    st.tuples(st.integers(0, 2**31 - 1), st.floats(-100.0, 0.0)), min_size=1, max_size=4
)


@given(
    st.lists(st.tuples(seq_ids, st.integers(0, 2**31 - 1), logprob_rows), max_size=10),
    st.booleans(),
)
def test_a_step_result_round_trips_through_bytes(rows: list, with_logprobs: bool) -> None:
    logprobs = [r[2] for r in rows] if with_logprobs and rows else None
    result = StepResult(-1 if not rows else 7, [r[0] for r in rows], [r[1] for r in rows], logprobs)
    data = wire_worker.result_to_pb(result, compute_ns=5).SerializeToString()
    assert wire_worker.result_from_pb(pb.StepResponse.FromString(data)) == result


def test_decode_plans_carry_packed_arrays_not_one_message_per_sequence() -> None:
    plan = StepPlan(step_id=1, seq_ids=list(range(256)), num_new_tokens=[1] * 256)
    data = wire_worker.plan_to_pb(plan, 1).SerializeToString()
    assert len(data) < 256 * 3 + 64  # a varint or two per sequence, no per-sequence messages
