"""The scheduler's torch-free Tokenizer and IncrementalDetokenizer, checked against transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_service.detokenizer import IncrementalDetokenizer
from scheduler_service.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\ttabbed",
    "café naïve résumé Zürich",
    "日本語のテキスト、東京",
    "emoji 🙂🚀 and a family 👩‍👩‍👧 and a flag 🇯🇵",
    "def f(x: int) -> int:\n    return x ** 2  # square",
    "numbers 3.14159, 1,000,000 and -42e-3",
    "<|im_start|>user\nspecial tokens in text<|im_end|>\n",
    "\ufffd a literal replacement character",
]
CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say café 🙂"},
        {"role": "assistant", "content": "café 🙂"},
        {"role": "user", "content": "Again, in 日本語."},
    ],
]
# Written in the style of Qwen3's template: namespace, reversed loop, tojson, raise_exception.
QWEN3_STYLE_TEMPLATE = """
{%- if tools %}
{{- '<|im_start|>system\\n' + (messages[0].content + '\\n\\n' if messages[0].role == 'system' else '') }}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages[::-1] %}
  {%- if ns.last_user < 0 and message.role == 'user' %}
    {%- set ns.last_user = messages|length - 1 - loop.index0 %}
  {%- endif %}
{%- endfor %}
{%- for message in messages %}
  {%- if message.content == 'FORBIDDEN' %}{{ raise_exception('forbidden content') }}{% endif %}
  {%- if message.role != 'system' or not loop.first %}
    {%- set think = loop.index0 > ns.last_user and message.role == 'assistant' %}
{{- '<|im_start|>' + message.role + '\\n' + ('<think>\\n\\n</think>\\n\\n' if think else '') }}
{{- message.content + '<|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{% endif %}
{%- endif %}
"""
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "<city> & more"}}]


@pytest.fixture(scope="module")
def ours(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def qwen3_style_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("qwen3_style")
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": QWEN3_STYLE_TEMPLATE})
    )
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return model_dir


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(ours: Tokenizer, reference: Any, text: str) -> None:
    ids = ours.encode(text)
    assert ids == reference(text)["input_ids"]
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_any_text_round_trips_like_transformers(ours: Tokenizer, reference: Any, text: str) -> None:
    ids = ours.encode(text)
    assert ids == reference(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_have_fixed_ids_and_end_the_sequence(ours: Tokenizer) -> None:
    assert [ours.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        0,
        1,
        2,
    ]
    assert ours.eos_token_ids == (2,)
    assert ours.special_token_ids == {0, 1, 2}
    assert ours.vocab_size == 2000


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(
    ours: Tokenizer, reference: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected


@pytest.mark.parametrize(
    "kwargs", [{}, {"enable_thinking": False}, {"tools": TOOLS}], ids=["plain", "no_think", "tools"]
)
def test_qwen3_style_template_renders_like_transformers(
    qwen3_style_dir: Path, kwargs: dict[str, Any]
) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(qwen3_style_dir, local_files_only=True)
    messages = CHATS[1][:3]
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    assert Tokenizer.from_dir(qwen3_style_dir).apply_chat_template(messages, **kwargs) == expected


def test_eos_ids_are_gathered_from_every_config(qwen3_style_dir: Path) -> None:
    assert Tokenizer.from_dir(qwen3_style_dir).eos_token_ids == (2, 0)


def test_template_raise_exception_becomes_value_error(qwen3_style_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(qwen3_style_dir)
    with pytest.raises(ValueError, match="forbidden content"):
        tokenizer.apply_chat_template([{"role": "user", "content": "FORBIDDEN"}])


def test_unknown_role_is_rejected_by_name(ours: Tokenizer) -> None:
    with pytest.raises(ValueError, match="'narrator'"):
        ours.apply_chat_template([{"role": "narrator", "content": "Once upon a time"}])


def test_message_without_content_is_rejected(ours: Tokenizer) -> None:
    with pytest.raises(ValueError, match="content"):
        ours.apply_chat_template([{"role": "user"}])


def test_scheduler_tokenizer_modules_never_import_torch_or_transformers() -> None:
    code = (
        "import sys, scheduler_service.tokenizer, scheduler_service.detokenizer; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    )
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module", params=["byte_table", "decode"])
def path(request: pytest.FixtureRequest) -> str:
    """The detokenizer's two paths: byte-level tables, and windowed decode() for other decoders."""
    return request.param


def _detokenize(
    tokenizer: Tokenizer,
    chunks: list[list[int]],
    skip_special_tokens: bool = True,
    path: str = "byte_table",
) -> list[str]:
    """Feed chunks of output ids through a fresh detokenizer; return every piece, flush last."""
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], skip_special_tokens)
    if path == "decode":
        detok._byte_table = None
    pieces = [detok.step(chunk) for chunk in chunks]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    assert detok.num_pending_tokens == 0
    return pieces


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.lists(st.integers(0, 2047), max_size=4), max_size=30),
    skip_special_tokens=st.booleans(),
)
def test_pieces_of_random_ids_join_to_their_decode(
    ours: Tokenizer, path: str, chunks: list[list[int]], skip_special_tokens: bool
) -> None:
    pieces = _detokenize(ours, chunks, skip_special_tokens, path)
    expected = ours.decode([i for chunk in chunks for i in chunk], skip_special_tokens)
    assert "".join(pieces) == expected
    if "\ufffd" not in expected:
        assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\ufffd")))
def test_text_streamed_one_token_at_a_time_arrives_whole(
    ours: Tokenizer, path: str, text: str
) -> None:
    pieces = _detokenize(ours, [[i] for i in ours.encode(text)], False, path)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_multibyte_character_split_across_tokens_comes_out_whole(
    ours: Tokenizer, path: str
) -> None:
    ids = ours.encode("語")
    assert len(ids) == 3  # one byte-level token per UTF-8 byte: no merge covers it
    assert _detokenize(ours, [[i] for i in ids], path=path) == ["", "", "語", ""]


def test_bytes_that_cannot_complete_are_emitted_without_waiting_for_flush(
    ours: Tokenizer,
) -> None:
    lead_byte_id = ours.encode("語")[0]  # 0xE8 starts a 3-byte character
    detok = IncrementalDetokenizer(ours, [])
    pieces = []
    for _ in range(12):
        pieces.append(detok.step([lead_byte_id]))
        assert detok.num_pending_tokens <= 3
    pieces.append(detok.flush())
    assert "".join(pieces) == "\ufffd" * 12
    assert "".join(pieces[:-1])  # most of it came out before the end


def test_special_tokens_are_kept_when_not_skipped(ours: Tokenizer) -> None:
    ids = ours.encode("hi<|im_end|>")
    assert "".join(_detokenize(ours, [[i] for i in ids], skip_special_tokens=False)) == (
        "hi<|im_end|>"
    )
    assert "".join(_detokenize(ours, [[i] for i in ids])) == "hi"
