"""The grammar mask against xgrammar's own apply function, the matcher's replay of a sequence's
output, and the checks of a constraint that need no compiler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from protos.sampling_params import Constraint, SamplingParams
from scheduler_service.request_checks import RequestLimits, validate_request
from worker_service.grammar_mask import GrammarMask, apply_grammar_mask, build_grammar_mask
from worker_service.grammars import GrammarCache, choice_ebnf, compiler_message
from worker_service.sequence_table import WorkerSequence

VOCAB_SIZE = 2048  # the tiny model's logits (its tokenizer has 2,000 tokens)
EOS = (2,)


@pytest.fixture(scope="module")
def grammars(tiny_model_dir: Path) -> GrammarCache:
    return GrammarCache(tiny_model_dir, VOCAB_SIZE, EOS)


def seq(seq_id: int, output: list[int], constraint: Constraint | None) -> WorkerSequence:
    prompt = [5, 6, 7]
    params = SamplingParams(constraint=constraint)
    return WorkerSequence(seq_id, prompt + output, len(prompt), params, seq_id, 0, 0)


@pytest.mark.parametrize("num_rows", [1, 3, 7])
def test_mask_equals_xgrammars_apply_token_bitmask(num_rows: int) -> None:
    generator = torch.Generator().manual_seed(num_rows)
    logits = torch.randn(num_rows + 2, VOCAB_SIZE, generator=generator)
    words = torch.randint(-(2**31), 2**31, (num_rows, VOCAB_SIZE // 32), generator=generator)
    rows = torch.arange(1, num_rows + 1)
    mask = GrammarMask(rows, words.to(torch.int32))
    expected, full = (
        logits.clone(),
        torch.full((num_rows + 2, VOCAB_SIZE // 32), -1, dtype=torch.int32),
    )
    full[rows] = mask.bitmask  # xgrammar's rows are the logits' rows; -1: every token allowed
    xgr.apply_token_bitmask_inplace(expected, full)
    out = apply_grammar_mask(logits, mask)
    assert torch.equal(out, expected)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[-1], logits[-1])  # untouched rows


def test_a_matcher_made_late_replays_the_output_it_has_not_seen(grammars: GrammarCache) -> None:
    """A sequence that already wrote ``{"a": `` gets the mask of what follows it, whether its
    matcher saw each token as it came or catches up on all of them at once."""
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    constraint = Constraint("json_schema", schema)
    tokenizer = AutoTokenizer.from_pretrained(grammars.model_dir)
    ids = tokenizer.encode('{"a": ')
    step_by_step, late = seq(0, [], constraint), seq(1, list(ids), constraint)
    for i in range(len(ids)):
        step_by_step.token_ids = step_by_step.token_ids[:3] + ids[: i + 1]
        build_grammar_mask([step_by_step], (0,), grammars)
    masks = build_grammar_mask([step_by_step, late], (0, 1), grammars).bitmask
    assert torch.equal(masks[0], masks[1])
    mask = GrammarMask(torch.tensor([0]), masks[:1])
    allowed = apply_grammar_mask(torch.zeros(1, VOCAB_SIZE), mask)[0]
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    assert all(allowed[d] == 0 for d in digits if d is not None)
    assert allowed[EOS[0]] == float("-inf")  # the object is not complete yet


def test_each_distinct_constraint_is_compiled_once(grammars: GrammarCache) -> None:
    first = grammars.compile(Constraint("regex", "[ab]+"))
    assert grammars.compile(Constraint("regex", "[ab]+")) is first
    assert grammars.compile(Constraint("regex", "[ab]*")) is not first


def test_choice_grammar_quotes_every_string() -> None:
    assert choice_ebnf(("a", 'say "hi"\n')) == 'root ::= "a" | "say \\"hi\\"\\n"'


def test_compiler_message_drops_the_cpp_location() -> None:
    error = RuntimeError("[23:53:16] /project/cpp/regex_converter.cc:94: Regex parsing error")
    assert compiler_message(error) == "Regex parsing error"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(ignore_eos=True), "sampling.ignore_eos=True is invalid: cannot be set"),
        (SamplingParams(min_tokens=2), "sampling.min_tokens=2 is invalid: must be 0 with"),
    ],
)
def test_a_constraint_refuses_what_would_keep_it_from_stopping(
    params: SamplingParams, message: str
) -> None:
    params.constraint = Constraint("regex", "a")
    with pytest.raises(ValueError, match=message):
        validate_request([1, 2], params, RequestLimits(VOCAB_SIZE, 64))
