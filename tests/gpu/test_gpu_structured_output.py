"""Structured output on CUDA: constrained rows in CUDA-graph decode steps take the re-sample path
(the graph's logits masked, then drawn again), and their outputs validate; the free rows beside
them come out as they do with graphs off. Run on a GPU host (tests/gpu/run_all.sh)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanoserve import LLM
from protos.sampling_params import Constraint, SamplingParams
from tests.structured_cases import MAX_TOKENS, SCHEMA_TEXT, assert_matches_schema

pytestmark = pytest.mark.gpu
JSON = Constraint("json_schema", SCHEMA_TEXT)


def run(model_dir: Path, enforce_eager: bool) -> list[dict]:
    llm = LLM(
        str(model_dir), device="cuda", block_size=16, max_num_seqs=32, num_kv_blocks=512,
        enforce_eager=enforce_eager,
    )  # fmt: skip
    try:
        constrained = [
            SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=MAX_TOKENS,
                           constraint=JSON)
            for i in range(16)
        ]  # fmt: skip
        free = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 8
        prompts = [f"record {i}:" for i in range(24)]
        return llm.generate(prompts, constrained + free, use_tqdm=False)
    finally:
        llm.close()


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_json_schema_outputs_validate_on_cuda(tiny_model_dir: Path, enforce_eager: bool) -> None:
    for out in run(tiny_model_dir, enforce_eager)[:16]:
        assert_matches_schema(out["text"])


def test_free_rows_beside_constrained_ones_equal_with_and_without_graphs(
    tiny_model_dir: Path,
) -> None:
    graphed, eager = run(tiny_model_dir, False), run(tiny_model_dir, True)
    assert [o["token_ids"] for o in graphed[16:]] == [o["token_ids"] for o in eager[16:]]
