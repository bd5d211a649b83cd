"""Per-request limits of the public API, checked at the edge before anything is queued.

Each limit is a flag of the scheduler (config.py) with a default that no honest client meets;
a request past one is INVALID_ARGUMENT with a message naming the field, the value and the flag.
Not here: the waiting-queue, stream-count and per-stream-buffer limits, which depend on the
engine's state and live in engine_loop.py (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from protos.sampling_params import SamplingParams
from scheduler_service.config import SchedulerServiceConfig


def check_request_id(request_id: str, config: SchedulerServiceConfig) -> None:
    if len(request_id) > config.max_request_id_chars:
        raise ValueError(
            f"request_id is invalid: {len(request_id)} characters, at most "
            f"{config.max_request_id_chars} allowed"
        )


def check_prompt(num_prompt_tokens: int, config: SchedulerServiceConfig) -> None:
    limit = config.max_prompt_tokens
    if limit is not None and num_prompt_tokens > limit:
        raise ValueError(
            f"prompt is invalid: {num_prompt_tokens} tokens, at most {limit} allowed "
            "(--max-prompt-tokens)"
        )


def check_sampling(params: SamplingParams, config: SchedulerServiceConfig) -> None:
    limit = config.max_output_tokens
    if limit is not None and params.max_tokens > limit:
        raise ValueError(
            f"sampling.max_tokens={params.max_tokens} is invalid: must be <= {limit} "
            "(--max-output-tokens)"
        )
    num_stop = len(params.stop) + len(params.stop_token_ids)
    if num_stop > config.max_num_stop:
        raise ValueError(
            f"sampling.stop is invalid: {num_stop} stop strings and stop token ids, at most "
            f"{config.max_num_stop} allowed"
        )
    longest = max((len(s) for s in params.stop), default=0)
    if longest > config.max_stop_chars:
        raise ValueError(
            f"sampling.stop is invalid: a stop string of {longest} characters, at most "
            f"{config.max_stop_chars} allowed"
        )
