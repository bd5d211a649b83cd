"""Per-request sampling parameters (no torch: the scheduler owns requests).

Not here: their allowed ranges, checked once at the API edge by
``scheduler_service.request_checks.validate_request`` (gRPC servicer and ``LLM.generate``).
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
