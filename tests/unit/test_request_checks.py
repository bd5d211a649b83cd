"""The one request check (validate_request) and the decoding that never raises (request_decoding).

Each rule is checked by the message it gives: the field as the caller named it, the value and the
allowed range. The gRPC and offline edges are covered end to end by tests/service/
test_grpc_errors.py, test_reliability_limits.py, test_fuzz_api.py and tests/unit/test_llm_api.py.
"""

from __future__ import annotations

import pytest

from protos.nanoserve.v1 import generation_pb2 as pb
from protos.sampling_params import SamplingParams
from scheduler_service.request_checks import RequestLimits, validate_request
from scheduler_service.request_decoding import Undecodable, lenient_deserializer

MODEL = RequestLimits(vocab_size=100, max_model_len=64)
SERVER = RequestLimits(
    vocab_size=100,
    max_model_len=64,
    max_prompt_tokens=10,
    max_output_tokens=20,
    max_num_stop=3,
    max_stop_chars=5,
    max_request_id_chars=8,
)

BAD_SAMPLING = [
    (SamplingParams(temperature=-0.5), "sampling.temperature=-0.5 is invalid: must be >= 0"),
    (SamplingParams(temperature=float("nan")), "sampling.temperature=nan is invalid"),
    (SamplingParams(top_p=0.0), "sampling.top_p=0.0 is invalid: must be in (0, 1]"),
    (SamplingParams(top_k=0), "sampling.top_k=0 is invalid: must be -1 or >= 1"),
    (SamplingParams(min_p=1.5), "sampling.min_p=1.5 is invalid: must be in [0, 1]"),
    (SamplingParams(max_tokens=0), "sampling.max_tokens=0 is invalid: must be >= 1"),
    (SamplingParams(min_tokens=-1), "sampling.min_tokens=-1 is invalid: must be >= 0"),
    (
        SamplingParams(max_tokens=4, min_tokens=5),
        "sampling.min_tokens=5 is invalid: must be <= max_tokens (4)",
    ),
    (SamplingParams(logprobs=21), "sampling.logprobs=21 is invalid: must be in [0, 20]"),
    (SamplingParams(seed=2**63), f"sampling.seed={2**63} is invalid: must be in [0, 2**63)"),
    (
        SamplingParams(stop_token_ids=[3, 100]),
        "sampling.stop_token_ids=100 is invalid: must be in [0, 100)",
    ),
    (SamplingParams(stop=["ok", ""]), "sampling.stop='' is invalid: must be non-empty strings"),
    (SamplingParams(stop=["x"], detokenize=False), "is invalid: needs detokenize=True"),
    (
        SamplingParams(presence_penalty=2.5),
        "sampling.presence_penalty=2.5 is invalid: must be in [-2, 2]",
    ),
    (
        SamplingParams(frequency_penalty=-2.01),
        "sampling.frequency_penalty=-2.01 is invalid: must be in [-2, 2]",
    ),
    (SamplingParams(frequency_penalty=float("nan")), "sampling.frequency_penalty=nan is invalid"),
    (
        SamplingParams(repetition_penalty=0.0),
        "sampling.repetition_penalty=0.0 is invalid: must be > 0 and finite",
    ),
    (SamplingParams(repetition_penalty=float("inf")), "sampling.repetition_penalty=inf"),
    (
        SamplingParams(logit_bias={5: 1.0, 100: 2.0}),
        "sampling.logit_bias=100 is invalid: must map ids in [0, 100)",
    ),
    (SamplingParams(logit_bias={-1: 2.0}), "sampling.logit_bias=-1 is invalid"),
    (
        SamplingParams(logit_bias={7: 100.5}),
        "sampling.logit_bias[7]=100.5 is invalid: must be in [-100, 100]",
    ),
]


def test_penalties_and_logit_bias_in_range_are_accepted() -> None:
    params = SamplingParams(
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=0.01,
        logit_bias={0: -100.0, 99: 100.0},
    )
    validate_request([1, 2], params, MODEL)


@pytest.mark.parametrize(("params", "message"), BAD_SAMPLING)
def test_a_sampling_value_out_of_range_is_named_with_its_range(
    params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError) as error:
        validate_request([1, 2], params, MODEL)
    assert message in str(error.value)


BAD_PROMPTS = [
    ([], "token_ids.ids is empty: at least one token is required"),
    ([5, 100], "token_ids.ids[1]=100 is invalid: must be in [0, 100) (the vocabulary)"),
    ([-1], "token_ids.ids[0]=-1 is invalid: must be in [0, 100)"),
    ([5] * 64, "token_ids.ids is invalid: 64 tokens leave no room for output within max_model_len"),
    (
        [5] * 60,
        "sampling.max_tokens=16 is invalid: prompt (60 tokens) + max_tokens must be <= "
        "max_model_len (64)",
    ),
]


@pytest.mark.parametrize(("prompt", "message"), BAD_PROMPTS)
def test_a_bad_prompt_is_named_as_the_caller_gave_it(prompt: list[int], message: str) -> None:
    with pytest.raises(ValueError) as error:
        validate_request(prompt, SamplingParams(), MODEL, prompt_field="token_ids.ids")
    assert message in str(error.value)


def test_a_prompt_may_fill_the_context_but_for_max_tokens() -> None:
    validate_request([99] * 63, SamplingParams(max_tokens=1), MODEL)
    validate_request([0] * 48, SamplingParams(max_tokens=16), MODEL)


PAST_SERVER_LIMITS = [
    (dict(prompt=[1] * 11), "prompt is invalid: 11 tokens, at most 10 allowed (--max-prompt-tokens)"),
    (
        dict(params=SamplingParams(max_tokens=21)),
        "sampling.max_tokens=21 is invalid: must be <= 20 (--max-output-tokens)",
    ),
    (
        dict(params=SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2])),
        "sampling.stop is invalid: 4 stop strings and stop token ids, at most 3 allowed",
    ),
    (
        dict(params=SamplingParams(stop=["abcdef"])),
        "sampling.stop is invalid: a stop string of 6 characters, at most 5 allowed",
    ),
    (dict(request_id="r" * 9), "request_id is invalid: 9 characters, at most 8 allowed"),
]  # fmt: skip


@pytest.mark.parametrize(("request_fields", "message"), PAST_SERVER_LIMITS)
def test_a_request_past_a_server_limit_names_the_limit(
    request_fields: dict[str, object], message: str
) -> None:
    request = {"prompt": [1, 2], "params": SamplingParams(), "request_id": "r", **request_fields}
    with pytest.raises(ValueError) as error:
        validate_request(
            request["prompt"],  # type: ignore[arg-type]
            request["params"],  # type: ignore[arg-type]
            SERVER,
            request_id=request["request_id"],  # type: ignore[arg-type]
        )
    assert message in str(error.value)
    validate_request(  # without server limits (the offline API) the same request is fine
        request["prompt"],  # type: ignore[arg-type]
        request["params"],  # type: ignore[arg-type]
        MODEL,
        request_id=request["request_id"],  # type: ignore[arg-type]
    )


MARK = b"@@@@"


def not_utf8(request: pb.GenerateRequest) -> bytes:
    return request.SerializeToString().replace(MARK, b"\xc3\x28\xff\xfe")


@pytest.mark.parametrize(
    ("request_with_mark", "field"),
    [
        (pb.GenerateRequest(text=MARK.decode()), "text"),
        (pb.GenerateRequest(text="a", sampling=pb.SamplingParams(stop=["x", "@@@@"])), "sampling.stop[1]"),
        (
            pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="@@@@")])),
            "chat.messages[0].content",
        ),
        (
            pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="@@@@")])),
            "chat.messages[0].role",
        ),
    ],
)  # fmt: skip
def test_a_string_that_is_not_utf8_decodes_to_a_reason_naming_its_field(
    request_with_mark: pb.GenerateRequest, field: str
) -> None:
    decoded = lenient_deserializer(pb.GenerateRequest)(not_utf8(request_with_mark))
    assert decoded == Undecodable(
        f"the request could not be decoded: {field} is not valid UTF-8 (a string field must be)"
    )


def test_bytes_that_are_no_message_decode_to_a_reason_and_valid_ones_to_the_message() -> None:
    deserialize = lenient_deserializer(pb.GenerateRequest)
    assert deserialize(b"\x12\xff") == Undecodable(
        "the request could not be decoded: it is not a nanoserve.v1.GenerateRequest in protobuf "
        "wire format"
    )
    request = pb.GenerateRequest(text="héllo 🙂", sampling=pb.SamplingParams(stop=["é"]))
    assert deserialize(request.SerializeToString()) == request
