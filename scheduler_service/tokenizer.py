"""Text <-> token ids and chat templates for the scheduler, without torch or transformers.

`Tokenizer.from_dir` reads a Hugging Face model directory: tokenizer.json (through the `tokenizers`
library), tokenizer_config.json (chat template, special tokens) and, when present,
chat_template.jinja, config.json and generation_config.json (extra end-of-sequence ids). Encoding
adds no special tokens, as Qwen's tokenizer does; decoding matches transformers' `decode` for
tokenizers that do not clean up spaces (Qwen's do not). Chat templates render in a sandboxed jinja2
environment set up the way transformers sets it up, so the prompt text is the same.

This is not a full `PreTrainedTokenizer`: no padding, truncation, tensors or slow tokenizers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
# The named special tokens transformers passes to chat templates (when the tokenizer has them).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson` filter: plain json.dumps, without jinja's HTML escaping."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandbox, options and helpers that transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_content(value: object) -> str | None:
    """A special token in tokenizer_config.json is either a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return str(value["content"])
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _as_ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _chat_template_source(model_dir: Path, config: Mapping[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, else tokenizer_config's (string or named list)."""
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template if isinstance(template, str) else None


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Raise ValueError unless there are messages and each has a known role and string content."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in CHAT_ROLES:
            allowed = ", ".join(sorted(CHAT_ROLES))
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {allowed}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} ({role}): content must be a string")


def _decoder_type(hf_tokenizer: HFTokenizer) -> str | None:
    decoder = json.loads(hf_tokenizer.to_str()).get("decoder") or {}
    return decoder.get("type")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's reversible map from bytes to printable characters, inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _build_byte_table(hf_tokenizer: HFTokenizer) -> list[bytes | str | None] | None:
    alphabet = _byte_level_alphabet()
    added = hf_tokenizer.get_added_tokens_decoder()
    table: list[bytes | str | None] = []
    for token_id in range(hf_tokenizer.get_vocab_size(with_added_tokens=True)):
        if token_id in added:
            table.append(added[token_id].content)
            continue
        token = hf_tokenizer.id_to_token(token_id)
        if token is None:
            table.append(None)
        elif any(c not in alphabet for c in token):
            return None  # not a byte-level vocabulary after all: use decode()
        else:
            table.append(bytes(alphabet[c] for c in token))
    return table


class Tokenizer:
    """A model's tokenizer as the scheduler needs it: encode, decode, chat template, eos ids."""

    def __init__(
        self,
        hf_tokenizer: HFTokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        """special_tokens maps names such as "eos_token" and "pad_token" to token strings."""
        self._tokenizer = hf_tokenizer
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self._template = compile_chat_template(chat_template) if chat_template else None
        eos_ids = [hf_tokenizer.token_to_id(self.eos_token)] if self.eos_token else []
        eos_ids += list(extra_eos_token_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(i for i in eos_ids if i is not None)
        )
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special
        )
        self._byte_table: list[bytes | str | None] | None = None
        self._byte_table_supported: bool | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load from a Hugging Face model directory (tokenizer.json is required)."""
        model_dir = Path(model_dir)
        hf_tokenizer = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = _read_json(model_dir / "tokenizer_config.json")
        special_tokens = {
            name: token
            for name in SPECIAL_TOKEN_NAMES
            if (token := _token_content(config.get(name))) is not None
        }
        extra_eos_ids = _as_ids(
            _read_json(model_dir / "generation_config.json").get("eos_token_id")
        )
        extra_eos_ids += _as_ids(_read_json(model_dir / "config.json").get("eos_token_id"))
        return cls(
            hf_tokenizer,
            chat_template=_chat_template_source(model_dir, config),
            special_tokens=special_tokens,
            extra_eos_token_ids=extra_eos_ids,
        )

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (the model's may be larger)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in the text are recognised, none are added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token_ids. Ids the tokenizer does not know decode to nothing."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def byte_level_table(self) -> list[bytes | str | None] | None:
        """Per token id: its bytes (byte-level BPE), its text (added tokens), or None (unknown).

        Only for tokenizers whose decoder is plain ByteLevel (GPT-2, Qwen): there decoding is
        concatenating these bytes and reading UTF-8, which the detokenizer does incrementally at
        a fraction of the cost of calling decode(). None for any other decoder.
        """
        if self._byte_table is None and self._byte_table_supported is None:
            self._byte_table_supported = _decoder_type(self._tokenizer) == "ByteLevel"
            if self._byte_table_supported:
                self._byte_table = _build_byte_table(self._tokenizer)
        return self._byte_table

    def decodes_to_nothing(self, token_id: int, skip_special_tokens: bool = True) -> bool:
        """True for ids decode() drops: unknown ids, and special ones when skipping them."""
        if skip_special_tokens and token_id in self.special_token_ids:
            return True
        return token_id < 0 or self._tokenizer.id_to_token(token_id) is None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render messages into the prompt text, as transformers' apply_chat_template(tokenize=False).

        The template sees messages, add_generation_prompt, tools and documents (None), the named
        special tokens (bos_token, eos_token, ...) and any extra keyword arguments (enable_thinking).
        Raises ValueError for a bad message, a missing template, or an error the template raises.
        """
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        validate_messages(messages)
        variables: dict[str, Any] = {"tools": None, "documents": None, **self.special_tokens}
        variables.update(template_kwargs)
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e
