"""The one check of a request, at the API edge (gRPC servicer, ``LLM.generate``): validate_request.

It runs once, on the decoded request (prompt token ids and SamplingParams), before anything is
queued, and raises ``ValueError`` whose message names the field, the value and the allowed range
(``sampling.top_p=1.5 is invalid: must be in (0, 1]``). The offline API passes it through; the
gRPC edge answers INVALID_ARGUMENT with it as the details. Behind the edge the engine only asserts.

Not here: decoding (wire_public.py: a missing input, a chat the template refuses), request_id
uniqueness (checked where the live requests are known: EngineClient and EngineCore), and the limits
that depend on the engine's state (waiting queue, streams, stream buffer: RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protos.sampling_params import Constraint, SamplingParams

MAX_LOGPROBS = 20
MAX_SEED = 2**63
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (vLLM's)
MAX_LOGIT_BIAS = 100.0  # a logit bias lies in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS] (OpenAI's)


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for: the model's (vocabulary, context) and the server's flags.

    A server limit left at None is not checked (the offline API sets none of them).
    """

    vocab_size: int
    max_model_len: int
    max_prompt_tokens: int | None = None  # --max-prompt-tokens
    max_output_tokens: int | None = None  # --max-output-tokens
    max_num_stop: int | None = None  # stop strings plus stop token ids
    max_stop_chars: int | None = None  # longest stop string
    max_request_id_chars: int | None = None


def validate_request(
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    limits: RequestLimits,
    *,
    request_id: str = "",
    prompt_field: str = "prompt",
    sampling_field: str = "sampling",
) -> None:
    """Raise ValueError naming the first field outside its allowed range.

    ``prompt_field`` and ``sampling_field`` name those fields as the caller gave them
    (``token_ids.ids``, ``sampling`` on the wire; ``prompts[0]``, ``sampling_params`` offline).
    """
    _check_request_id(request_id, limits)
    _check_sampling(params, limits.vocab_size, sampling_field)
    _check_sampling_limits(params, limits, sampling_field)
    _check_constraint(params, sampling_field)
    _check_prompt(prompt_token_ids, limits, prompt_field)
    num_prompt_tokens = len(prompt_token_ids)
    if num_prompt_tokens + params.max_tokens > limits.max_model_len:
        raise ValueError(
            f"{sampling_field}.max_tokens={params.max_tokens} is invalid: prompt "
            f"({num_prompt_tokens} tokens) + max_tokens must be <= max_model_len "
            f"({limits.max_model_len})"
        )


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {rule}")


def _check_request_id(request_id: str, limits: RequestLimits) -> None:
    limit = limits.max_request_id_chars
    if limit is not None and len(request_id) > limit:
        raise ValueError(
            f"request_id is invalid: {len(request_id)} characters, at most {limit} allowed"
        )


def _check_sampling(params: SamplingParams, vocab_size: int, field: str) -> None:
    """The ranges of SamplingParams' own fields (the proto's comments state the same ones)."""
    p = params
    seed_ok = p.seed is None or 0 <= p.seed < MAX_SEED
    max_tokens_rule = f"must be <= max_tokens ({p.max_tokens})"
    logprobs_rule = f"must be in [0, {MAX_LOGPROBS}]"
    rules = (
        (p.temperature >= 0.0, "temperature", p.temperature, "must be >= 0"),
        (0.0 < p.top_p <= 1.0, "top_p", p.top_p, "must be in (0, 1]"),
        (p.top_k == -1 or p.top_k >= 1, "top_k", p.top_k, "must be -1 or >= 1"),
        (0.0 <= p.min_p <= 1.0, "min_p", p.min_p, "must be in [0, 1]"),
        (p.max_tokens >= 1, "max_tokens", p.max_tokens, "must be >= 1"),
        (p.min_tokens >= 0, "min_tokens", p.min_tokens, "must be >= 0"),
        (p.min_tokens <= p.max_tokens, "min_tokens", p.min_tokens, max_tokens_rule),
        (0 <= p.logprobs <= MAX_LOGPROBS, "logprobs", p.logprobs, logprobs_rule),
        (seed_ok, "seed", p.seed, "must be in [0, 2**63)"),
        (p.detokenize or not p.stop, "stop", p.stop, "needs detokenize=True"),
        *_penalty_rules(p),
    )
    for ok, name, value, rule in rules:
        _check(ok, f"{field}.{name}", value, rule)
    _check_logit_bias(p.logit_bias, vocab_size, field)
    for token_id in p.stop_token_ids:
        ok = 0 <= token_id < vocab_size
        _check(ok, f"{field}.stop_token_ids", token_id, f"must be in [0, {vocab_size})")
    for text in p.stop:
        _check(
            isinstance(text, str) and text != "", f"{field}.stop", text, "must be non-empty strings"
        )


def _penalty_rules(p: SamplingParams) -> tuple[tuple[bool, str, object, str], ...]:
    """vLLM's ranges; NaN fails every comparison, so it is refused too."""
    in_range = f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"
    return (
        (abs(p.presence_penalty) <= MAX_PENALTY, "presence_penalty", p.presence_penalty, in_range),
        (
            abs(p.frequency_penalty) <= MAX_PENALTY,
            "frequency_penalty",
            p.frequency_penalty,
            in_range,
        ),
        (
            0.0 < p.repetition_penalty < float("inf"),
            "repetition_penalty",
            p.repetition_penalty,
            "must be > 0 and finite (1 = off)",
        ),
    )


def _check_logit_bias(logit_bias: dict[int, float], vocab_size: int, field: str) -> None:
    for token_id, bias in logit_bias.items():
        in_vocab = isinstance(token_id, int) and 0 <= token_id < vocab_size
        _check(in_vocab, f"{field}.logit_bias", token_id, f"must map ids in [0, {vocab_size})")
        _check(
            abs(bias) <= MAX_LOGIT_BIAS,
            f"{field}.logit_bias[{token_id}]",
            bias,
            f"must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
        )


def _check_constraint(params: SamplingParams, field: str) -> None:
    """What can be checked without the compiler (the worker compiles: ``compile_error``)."""
    constraint = params.constraint
    if constraint is None:
        return
    name = f"{field}.{constraint.kind}"
    _check(not params.ignore_eos, f"{field}.ignore_eos", True, f"cannot be set with {name}")
    _check(
        params.min_tokens == 0, f"{field}.min_tokens", params.min_tokens, f"must be 0 with {name}"
    )
    if constraint.kind == "choice":
        _check(bool(constraint.choices), f"{name}.choices", [], "must name at least one string")


def compile_error(constraint: Constraint, message: str, field: str = "sampling") -> ValueError:
    """The error of a constraint that did not compile: the field, then the compiler's message."""
    return ValueError(f"{field}.{constraint.kind} is invalid: {message}")


def _check_sampling_limits(params: SamplingParams, limits: RequestLimits, field: str) -> None:
    max_tokens = limits.max_output_tokens
    if max_tokens is not None and params.max_tokens > max_tokens:
        raise ValueError(
            f"{field}.max_tokens={params.max_tokens} is invalid: must be <= {max_tokens} "
            "(--max-output-tokens)"
        )
    num_stop = len(params.stop) + len(params.stop_token_ids)
    if limits.max_num_stop is not None and num_stop > limits.max_num_stop:
        raise ValueError(
            f"{field}.stop is invalid: {num_stop} stop strings and stop token ids, at most "
            f"{limits.max_num_stop} allowed"
        )
    longest = max((len(s) for s in params.stop), default=0)
    if limits.max_stop_chars is not None and longest > limits.max_stop_chars:
        raise ValueError(
            f"{field}.stop is invalid: a stop string of {longest} characters, at most "
            f"{limits.max_stop_chars} allowed"
        )


def _check_prompt(prompt_token_ids: Sequence[int], limits: RequestLimits, field: str) -> None:
    num_tokens = len(prompt_token_ids)
    if num_tokens == 0:
        raise ValueError(f"{field} is empty: at least one token is required")
    vocab_size = limits.vocab_size
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:  # the index only then
        i, token_id = next(
            (i, t) for i, t in enumerate(prompt_token_ids) if not 0 <= t < vocab_size
        )
        raise ValueError(
            f"{field}[{i}]={token_id} is invalid: must be in [0, {vocab_size}) (the vocabulary)"
        )
    if limits.max_prompt_tokens is not None and num_tokens > limits.max_prompt_tokens:
        raise ValueError(
            f"{field} is invalid: {num_tokens} tokens, at most {limits.max_prompt_tokens} "
            "allowed (--max-prompt-tokens)"
        )
    if num_tokens >= limits.max_model_len:
        raise ValueError(
            f"{field} is invalid: {num_tokens} tokens leave no room for output within "
            f"max_model_len ({limits.max_model_len})"
        )
