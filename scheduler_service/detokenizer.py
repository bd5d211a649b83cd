"""Incremental detokenization: turn a stream of output token ids into a stream of text pieces.

The approach is vLLM's. Keep a short window of recent output tokens split by two offsets: tokens
before `read_offset` have been emitted (the ones from `prefix_offset` on are kept only as decoding
context), tokens after it are pending. Each new token decodes the window; if the text no longer
ends in U+FFFD (a UTF-8 character still split across tokens), the text beyond the prefix is new
and is emitted, and the window slides forward. So every step decodes a few tokens, never the whole
output.

Invariant: the pieces returned by `step` and `flush`, joined, equal
`tokenizer.decode(output_ids, skip_special_tokens)`. Output text is decoded from the output ids
alone, never joined to the prompt's text, so that invariant holds even when the prompt ends in half
a character. A U+FFFD that may still become a character is held back; one that later tokens prove
invalid is emitted with the text around it, and `flush` emits whatever is still pending.

Byte-level BPE tokenizers (GPT-2, Qwen) take a faster path with the same result: each token is a
fixed byte string, so the text is an incremental UTF-8 decode of the concatenated bytes (Python's
codecs, about a microsecond per token instead of a decode() call per token).

Not here: stop strings (stop_checker.py) and the token ids themselves (the Sequence keeps them).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from scheduler_service.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character is at most 4 bytes and every windowed token decodes to at least one byte, so
# once this many tokens are pending the trailing U+FFFD can span at most the last three of them.
MIN_PENDING_TO_SPLIT = 4
# Bound on pending tokens even for decoders where the split above is never found.
MAX_PENDING_TOKENS = 16


class IncrementalDetokenizer:
    """Text for one sequence's output tokens, a piece at a time, O(1) work per token."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        """prompt_token_ids only sets num_prompt_tokens; output text is decoded on its own."""
        self.tokenizer = tokenizer
        self.num_prompt_tokens = len(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._window_ids: list[int] = []  # output tokens from the prefix offset on
        self._read_offset = 0  # index into _window_ids: everything before it has been emitted
        self._prefix_text = ""  # decode(_window_ids[:_read_offset])
        self._byte_table = tokenizer.byte_level_table()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose text has not been emitted yet (a split character, usually 0 or 1)."""
        return len(self._window_ids) - self._read_offset

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Add output tokens; return the text they complete ("" while a character is split)."""
        add = self._add if self._byte_table is None else self._add_bytes
        pieces = [add(token_id) for token_id in new_token_ids]
        delta = "".join(pieces)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit the pending text at the end of the sequence, U+FFFD and all."""
        delta = ""
        if self._byte_table is not None:
            delta = self._utf8.decode(b"", final=True)
        elif self.num_pending_tokens:
            delta = self._emit_through(len(self._window_ids), self._decode(self._window_ids))
        self.text += delta
        return delta

    def _add_bytes(self, token_id: int) -> str:
        table = self._byte_table
        assert table is not None  # only called on the byte-level path
        entry = table[token_id] if 0 <= token_id < len(table) else None
        if entry is None:
            return ""
        if isinstance(entry, str):  # an added token: its text, after any pending bytes
            if self.skip_special_tokens and token_id in self.tokenizer.special_token_ids:
                return ""
            return self._utf8.decode(b"", final=True) + entry
        return self._utf8.decode(entry)

    def _add(self, token_id: int) -> str:
        if self.tokenizer.decodes_to_nothing(token_id, self.skip_special_tokens):
            return ""  # dropped by decode() anyway; keeping it out means every token adds bytes
        self._window_ids.append(token_id)
        text = self._decode(self._window_ids)
        if len(text) > len(self._prefix_text) and not text.endswith(REPLACEMENT_CHAR):
            return self._emit_through(len(self._window_ids), text)
        if self.num_pending_tokens < MIN_PENDING_TO_SPLIT:
            return ""
        settled = self._settled_offset(text)
        if settled is not None:
            return self._emit_through(settled, self._decode(self._window_ids[:settled]))
        if self.num_pending_tokens >= MAX_PENDING_TOKENS:
            return self._emit_through(len(self._window_ids), text)  # give up holding back
        return ""

    def _settled_offset(self, text: str) -> int | None:
        """The last pending token boundary that later tokens can no longer change, if any.

        A boundary k is settled when the window decodes to the same text in two halves as in one,
        and the right half is not empty: the bytes after k are known, so they have already decided
        whether the bytes before k finish a character, and they did not join them.
        """
        first = max(self._read_offset + 1, len(self._window_ids) - MIN_PENDING_TO_SPLIT + 1)
        for k in range(len(self._window_ids) - 1, first - 1, -1):
            left = self._decode(self._window_ids[:k])
            right = self._decode(self._window_ids[k:])
            if right and left + right == text and left.startswith(self._prefix_text):
                return k
        return None

    def _emit_through(self, offset: int, text: str) -> str:
        """Emit text (the decoded window up to offset) beyond the prefix; slide the window."""
        delta = text[len(self._prefix_text) :]
        self._slide(offset)
        return delta

    def _slide(self, new_read_offset: int) -> None:
        """Mark tokens before new_read_offset emitted; the previously read ones become the prefix."""
        del self._window_ids[: self._read_offset]
        self._read_offset = new_read_offset - self._read_offset
        self._prefix_text = self._decode(self._window_ids[: self._read_offset])

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
