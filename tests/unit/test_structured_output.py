"""Structured output offline (nanoserve.LLM) on the tiny random model: its unconstrained output is
garbage, so only the grammar mask makes these outputs parse."""

from __future__ import annotations

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

JSON = Constraint("json_schema", SCHEMA_TEXT)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path):
    llm = LLM(str(tiny_model_dir), device="cpu", block_size=16, num_kv_blocks=512)
    yield llm
    llm.close()


def constrained(i: int, constraint: Constraint) -> SamplingParams:
    """Greedy for even i, seeded sampling for odd i."""
    temperature = 0.0 if i % 2 == 0 else 1.0
    return SamplingParams(
        temperature=temperature, seed=i, max_tokens=MAX_TOKENS, constraint=constraint
    )


def test_fifty_json_schema_requests_all_parse_and_validate(llm: LLM) -> None:
    prompts = [f"record {i}:" for i in range(50)]
    outputs = llm.generate(prompts, [constrained(i, JSON) for i in range(50)], use_tqdm=False)
    for out in outputs:
        assert_matches_schema(out["text"])
        assert out["token_ids"][-1] in llm.engine.info.eos_token_ids  # finished with STOP


def test_regex_and_choice_constraints_hold(llm: LLM) -> None:
    regex, choice = Constraint("regex", REGEX), Constraint("choice", choices=CHOICES)
    params = [constrained(i, regex) for i in range(6)] + [constrained(i, choice) for i in range(6)]
    outputs = llm.generate(["pet:"] * 6 + ["color:"] * 6, params, use_tqdm=False)
    for out in outputs[:6]:
        assert_matches_regex(out["text"])
    assert {out["text"] for out in outputs[6:]} <= set(CHOICES)


def test_free_requests_beside_constrained_ones_are_unchanged(llm: LLM) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["a b c", "d e f"], free, use_tqdm=False)
    prompts = ["a b c", "x:", "d e f", "y:"]
    params = [free, constrained(0, JSON), free, constrained(1, JSON)]
    mixed = llm.generate(prompts, params, use_tqdm=False)
    assert [mixed[0], mixed[2]] == alone
    for out in (mixed[1], mixed[3]):
        assert_matches_schema(out["text"])


def test_constraints_hold_through_preemption(tiny_model_dir: Path) -> None:
    """16 blocks of 16 tokens cannot hold 8 sequences' outputs: some are preempted, recomputed,
    and their matchers go on from where they were."""
    llm = LLM(str(tiny_model_dir), device="cpu", block_size=16, num_kv_blocks=16)
    try:
        params = [constrained(i, JSON) for i in range(8)]
        outputs = llm.generate([f"p{i} " * 6 for i in range(8)], params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
    finally:
        llm.close()
    for out in outputs:
        assert_matches_schema(out["text"])


@pytest.mark.parametrize(
    ("constraint", "field", "message"),
    [
        (Constraint("regex", "a(b"), "sampling_params.regex", "parenthesis is not closed"),
        (Constraint("json_schema", '{"type": "nope"}'), "sampling_params.json_schema", "nope"),
        (Constraint("json_schema", "{bad"), "sampling_params.json_schema", "Failed to parse JSON"),
        (Constraint("grammar", "root ::= foo"), "sampling_params.grammar", '"foo" is not defined'),
    ],
)
def test_a_constraint_that_does_not_compile_names_the_field_and_the_compilers_message(
    llm: LLM, constraint: Constraint, field: str, message: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{field} is invalid: .*{message}") as raised:
        llm.generate("x", SamplingParams(constraint=constraint), use_tqdm=False)
    assert "/project/cpp" not in str(raised.value)  # the C++ source location is cut
    assert not llm.engine.has_unfinished


def test_the_grammar_compiler_is_built_at_start_not_by_the_first_check(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built on first use, it made the first constrained request wait seconds and stalled the
    steps beside it; started with the worker, the first check only compiles its grammar."""
    import time

    from models.config import ModelConfig
    from worker_service.grammars import GrammarCache

    config = ModelConfig.from_dir(tiny_model_dir)
    cache = GrammarCache(tiny_model_dir, config.vocab_size, config.eos_token_ids)
    cache.start_compiler()
    deadline = time.monotonic() + 120
    while cache._compiler is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache._compiler is not None
    monkeypatch.setattr(cache, "_make_compiler", lambda: pytest.fail("compiler built again"))
    assert cache.error(Constraint("regex", "(ab)+")) == ""


def test_transformers_imports_beside_the_compiler_thread(tiny_model_dir: Path) -> None:
    """The compiler's thread once imported transformers itself; a user importing it a moment
    later (right after building an LLM) got a half-made package: ImportError at 0.2 and 0.4 s
    on a 2-core machine. Fresh interpreters, so that nothing imported it before."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    for delay in (0.2, 0.4):
        script = (
            "import time\n"
            "from models.config import ModelConfig\n"
            "from worker_service.grammars import GrammarCache\n"
            f"config = ModelConfig.from_dir({str(tiny_model_dir)!r})\n"
            f"GrammarCache({str(tiny_model_dir)!r}, config.vocab_size, config.eos_token_ids)"
            ".start_compiler()\n"
            f"time.sleep({delay})\n"
            "from transformers import AutoModelForCausalLM\n"
            "print('imported')\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"after {delay} s: {done.stderr[-1500:]}"
        assert done.stdout.strip() == "imported"
