"""The engine thread's commands: adds and aborts applied in order, refusals and aborts reported."""

from __future__ import annotations

from nanoserve import LLM, SamplingParams
from scheduler_service.engine_commands import AbortRequest, AddRequest, apply_commands
from scheduler_service.stop_checker import FinishReason


def test_commands_apply_in_order_and_report_refusals_and_aborts(tiny_model_dir) -> None:
    llm = LLM(str(tiny_model_dir), device="cpu", block_size=16, num_kv_blocks=64)
    engine = llm.engine
    params = SamplingParams(max_tokens=4)
    applied = apply_commands(
        engine,
        [
            AddRequest("kept", [1, 2, 3], params),
            AddRequest("kept", [4], params),  # refused: a live request has this id
            AddRequest("gone", [4, 5], params),
            AbortRequest("gone"),
            AbortRequest("never-added"),  # nothing to abort: no output
        ],
    )
    assert applied.num_adds == 3
    assert [(rid, "already in use" in str(e)) for rid, e in applied.refused] == [("kept", True)]
    assert [(o.request_id, o.finished, o.finish_reason) for o in applied.aborted] == [
        ("gone", True, FinishReason.ABORT)
    ]
    assert engine.has_unfinished
    assert apply_commands(engine, [AbortRequest("kept")]).aborted[0].request_id == "kept"
    assert not engine.has_unfinished
