"""Structured output on CUDA: constrained rows in CUDA-graph decode steps take the re-sample path
(the graph's logits masked, then drawn again), and their outputs validate; the free rows beside
them come out as they do with graphs off. Run on a GPU host (tests/gpu/run_all.sh)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from nanoserve import LLM
from protos.sampling_params import Constraint, SamplingParams
from tests.structured_cases import (
    CHOICES,
    MAX_TOKENS,
    REGEX,
    SCHEMA_TEXT,
    assert_matches_regex,
    assert_matches_schema,
)

pytestmark = pytest.mark.gpu
JSON = Constraint("json_schema", SCHEMA_TEXT)


@functools.cache  # two tests read the same two runs: build each engine once
def run(model_dir: Path, enforce_eager: bool, attention_backend: str) -> list[dict]:
    llm = LLM(
        str(model_dir), device="cuda", block_size=16, max_num_seqs=32, num_kv_blocks=512,
        enforce_eager=enforce_eager, attention_backend=attention_backend,
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
def test_json_schema_outputs_validate_on_cuda(
    tiny_model_dir: Path, enforce_eager: bool, attention_backend: str
) -> None:
    for out in run(tiny_model_dir, enforce_eager, attention_backend)[:16]:
        assert_matches_schema(out["text"])


def test_free_rows_beside_constrained_ones_equal_with_and_without_graphs(
    tiny_model_dir: Path, attention_backend: str
) -> None:
    graphed = run(tiny_model_dir, False, attention_backend)
    eager = run(tiny_model_dir, True, attention_backend)
    assert [o["token_ids"] for o in graphed[16:]] == [o["token_ids"] for o in eager[16:]]


def test_constrained_outputs_validate_on_the_qwen3_06b_architecture(
    tmp_path: Path, attention_backend: str
) -> None:
    """50 JSON-schema requests (greedy and sampled), regex and choice requests, beside free ones,
    on a random-weight Qwen3-0.6B (vocabulary 151,936: the tokenizer's ids and the rest masked)
    at the engine's default limits: every constrained output parses and validates."""
    from bench.checkpoint import write_random_checkpoint

    model_dir = write_random_checkpoint(tmp_path / "qwen3-0.6b", "qwen3-0.6b")
    llm = LLM(str(model_dir), device="cuda", attention_backend=attention_backend)
    try:
        json_params = [
            SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=MAX_TOKENS,
                           constraint=JSON)
            for i in range(50)
        ]  # fmt: skip
        regex = Constraint("regex", REGEX)
        choice = Constraint("choice", choices=CHOICES)
        regex = SamplingParams(temperature=1.0, seed=1, max_tokens=MAX_TOKENS, constraint=regex)
        choice = SamplingParams(temperature=1.0, seed=2, max_tokens=MAX_TOKENS, constraint=choice)
        free = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
        params = [*json_params, *[regex] * 8, *[choice] * 8, *[free] * 16]
        outputs = llm.generate([f"item {i}:" for i in range(len(params))], params, use_tqdm=False)
    finally:
        llm.close()
    for out in outputs[:50]:
        assert_matches_schema(out["text"])
    for out in outputs[50:58]:
        assert_matches_regex(out["text"])
    assert all(out["text"] in CHOICES for out in outputs[58:66])
    assert all(len(out["token_ids"]) == 64 for out in outputs[66:])
