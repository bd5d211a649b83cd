"""Per-request sampling parameters (no torch: the scheduler owns requests).

Not here: their allowed ranges, checked once at the API edge by
``scheduler_service.request_checks.validate_request`` (gRPC servicer and ``LLM.generate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Constraint:
    """Structured output: what the generated text must match (hashable: the grammar cache's key).

    ``kind`` is one of "json_schema", "regex", "grammar", "json_object", "choice" (the wire's
    oneof field); ``spec`` the schema, regex or EBNF text ("" for json_object and choice);
    ``choices`` the strings of a choice.
    """

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Defaults follow vLLM's.

    temperature 0 means greedy. top_k -1 means no limit. A ``seed`` makes this request's samples
    reproducible whatever else shares its batch. The penalties and ``logit_bias`` change the
    logits before anything else (greedy rows too), as vLLM applies them: ``logit_bias`` is added
    first; repetition_penalty divides the positive and multiplies the negative logits of every
    token seen in the prompt or the output (1 = off); frequency_penalty subtracts itself times
    the token's count in the output so far, presence_penalty once for a token in the output
    (0 = off, OpenAI's definition). A ``constraint`` masks every token that would leave its
    grammar, after the penalties; the sequence stops (EOS) once the grammar is complete.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    logprobs: int = 0
    detokenize: bool = True  # False: token ids only, no text (saves the host's time)
    include_stop_str_in_output: bool = False  # True: the text ends with the stop string it hit
    skip_special_tokens: bool = True  # False: special tokens are decoded into the text too
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    constraint: Constraint | None = None  # structured output (worker_service/grammars.py)

    def __post_init__(self) -> None:
        # Accept None, one string or any iterable from callers; keep tuples.
        if self.stop is None:
            self.stop = ()
        elif isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids or ())
        self.logit_bias = dict(self.logit_bias or {})

    @property
    def adjusts_logits(self) -> bool:
        """A penalty or a logit bias is on: the worker changes this row's logits before sampling."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )
