"""Token-level stop checks: EOS, stop token ids, max_tokens, max_model_len.

Stop strings need text, so the engine checks them after detokenizing (see engine.py).
"""

from __future__ import annotations

from enum import Enum

from scheduler_service.sequence import Sequence


class FinishReason(Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


def check_stop(
    seq: Sequence, token_id: int, eos_token_ids: tuple[int, ...], max_model_len: int
) -> FinishReason | None:
    """Why ``seq`` must stop at its newest known token ``token_id``, or None to go on."""
    params = seq.params
    num_output = seq.num_known_output_tokens
    if num_output > params.min_tokens:  # the first min_tokens never stop
        if not params.ignore_eos and token_id in eos_token_ids:
            return FinishReason.STOP
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
    if num_output >= params.max_tokens or seq.num_prompt_tokens + num_output >= max_model_len:
        return FinishReason.LENGTH
    return None
