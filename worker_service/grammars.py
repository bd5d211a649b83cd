"""Structured output on the worker: constraints compiled by xgrammar, and a matcher per sequence.

``GrammarCache`` compiles each distinct ``Constraint`` once against the model's vocabulary (an
xgrammar ``TokenizerInfo`` built from the model directory's tokenizer files through transformers,
in a background thread from worker start) and keeps it. ``SequenceGrammar`` is one sequence's matcher: before each draw it
accepts the sequence's output tokens it has not seen yet (so a matcher made late, or kept across
a preemption, replays the output) and fills the sequence's row of next-token bitmask. Only rank 0
samples, so only rank 0 builds matchers. Not here: applying the bitmask (grammar_mask.py) and
when it runs in a step (model_runner.py).

JSON schemas compile without free whitespace (compact JSON): a model cannot pad its output with
endless blanks before the schema is complete.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

import torch

from protos.sampling_params import Constraint

log = logging.getLogger(__name__)
_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[12:00:00] /project/cpp/x.cc:94: "


def compiler_message(error: Exception) -> str:
    """xgrammar's message without the C++ source location it starts with."""
    return _LOCATION.sub("", str(error).strip())


def choice_ebnf(choices: tuple[str, ...]) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (JSON string escapes are xgrammar's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCache:
    """Compiled grammars by constraint; thread-safe (the check RPC and the step thread share it)."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size  # the logits' width: bitmask rows cover all of it
        self.eos_token_ids = eos_token_ids
        self._compiler: Any = None
        self._compiled: dict[Constraint, Any] = {}
        self._lock = threading.Lock()

    def start_compiler(self) -> None:
        """Build the compiler now, in a background thread: the tokenizer's vocabulary for
        xgrammar takes seconds on a large vocabulary, mostly holding the GIL. Built on first use
        instead, the first constrained request waited for it and the steps beside it stalled."""
        if not (self.model_dir / "tokenizer.json").is_file():
            return  # no tokenizer, no constraints: a check says so when one comes
        # transformers is imported here, not in the thread: its package swaps itself for a lazy
        # module in sys.modules while it loads, so another thread importing it meanwhile (a user
        # of the in-process LLM, say) found a half-made package (KeyError 'transformers.utils').
        # Where it is not installed (the worker image), the thread logs that, as before.
        try:
            import transformers  # noqa: F401
        except ImportError:
            pass

        # Not a daemon: a process ending while the build runs waits for it. Killed at exit in
        # the middle of xgrammar's and the tokenizer's native code, the process aborted
        # ("terminate called without an active exception") in 9 of 30 short scripts.
        threading.Thread(target=self._build_compiler, name="grammar-compiler").start()

    def _build_compiler(self) -> None:
        with self._lock:
            if self._compiler is None:
                try:
                    self._compiler = self._make_compiler()
                except Exception as e:  # noqa: BLE001 - compile() tries again and reports it
                    log.warning("grammar compiler not built at start: %s", e)

    def _make_compiler(self) -> Any:
        import transformers
        import xgrammar as xgr

        tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.eos_token_ids)
        )
        return xgr.GrammarCompiler(info)

    def compile(self, constraint: Constraint) -> Any:
        """The compiled grammar of ``constraint``; ValueError with the compiler's message. A hit
        takes no lock: the step thread never waits while a check compiles another constraint."""
        compiled = self._compiled.get(constraint)
        if compiled is not None:
            return compiled
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is None:
                if self._compiler is None:
                    self._compiler = self._make_compiler()
                try:
                    compiled = self._compile(self._compiler, constraint)
                except RuntimeError as e:
                    raise ValueError(compiler_message(e)) from None
                self._compiled[constraint] = compiled
            return compiled

    @staticmethod
    def _compile(compiler: Any, constraint: Constraint) -> Any:
        kind = constraint.kind
        if kind == "json_schema":
            return compiler.compile_json_schema(constraint.spec, any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(constraint.spec)
        if kind == "grammar":
            return compiler.compile_grammar(constraint.spec)
        if kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if kind == "choice":
            return compiler.compile_grammar(choice_ebnf(constraint.choices))
        raise ValueError(f"unknown constraint kind {kind!r}")

    def error(self, constraint: Constraint) -> str:
        """Compile now (cached); the compiler's message, or "" when it compiled."""
        try:
            self.compile(constraint)
        except ValueError as e:
            return str(e)
        return ""

    def matcher(self, constraint: Constraint) -> SequenceGrammar:
        import xgrammar as xgr

        return SequenceGrammar(xgr.GrammarMatcher(self.compile(constraint)))


class SequenceGrammar:
    """One sequence's matcher and how many of its output tokens it has accepted."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.num_accepted = 0

    def catch_up(self, token_ids: list[int], num_prompt_tokens: int) -> None:
        """Accept the output tokens (``token_ids`` past the prompt) not seen yet, all known: none
        PENDING. A token after the grammar ended (a wasted token of async scheduling) changes
        nothing."""
        for token_id in token_ids[num_prompt_tokens + self.num_accepted :]:
            if not self.matcher.is_terminated() and not self.matcher.accept_token(token_id):
                log.warning("the grammar matcher refused token %d", token_id)
        self.num_accepted = len(token_ids) - num_prompt_tokens

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        """Row ``index`` of ``bitmask`` [R, ceil(V / 32)] int32: the tokens the grammar allows
        next; every token once it has ended (that draw is never shown)."""
        if self.matcher.is_terminated():
            bitmask[index] = -1
        else:
            self.matcher.fill_next_token_bitmask(bitmask, index)
