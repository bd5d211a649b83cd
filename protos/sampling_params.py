"""Per-request sampling parameters and their validation (no torch: the scheduler owns requests).

Validation raises ``ValueError`` whose message names the field and its allowed range; the offline
API passes it through, the gRPC edge turns it into INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Defaults follow vLLM's.

    temperature 0 means greedy. top_k -1 means no limit. A ``seed`` makes this request's samples
    reproducible whatever else shares its batch.
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

    def __post_init__(self) -> None:
        # Accept None, one string or any iterable from callers; keep tuples.
        if self.stop is None:
            self.stop = ()
        elif isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids or ())

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first field outside its allowed range."""
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k, "must be -1 or >= 1")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be >= 1")
        _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be >= 0")
        _check(
            self.min_tokens <= self.max_tokens,
            "min_tokens",
            self.min_tokens,
            f"must be <= max_tokens ({self.max_tokens})",
        )
        _check(0 <= self.logprobs <= 20, "logprobs", self.logprobs, "must be in [0, 20]")
        if self.seed is not None:
            _check(0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2**63)")
        for token_id in self.stop_token_ids:
            _check(
                0 <= token_id < vocab_size,
                "stop_token_ids",
                token_id,
                f"must be in [0, {vocab_size})",
            )
        _check(self.detokenize or not self.stop, "stop", self.stop, "needs detokenize=True")
        for text in self.stop:
            _check(isinstance(text, str) and text != "", "stop", text, "must be non-empty strings")


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {rule}")
