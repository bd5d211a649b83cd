"""Hostile input: property-based fuzzing of GenerateRequest (and Tokenize) over the real gRPC API.

Hypothesis builds requests with field values at the edges of their types (NaN and infinite
floats, int32/uint32/uint64 extremes), unknown chat roles, huge stop lists, very long prompts,
odd Unicode and ids outside the vocabulary. The property: the server only ever answers OK or
INVALID_ARGUMENT (never INTERNAL, never a lost worker), and afterwards still serves the reference
output with every KV block free. Derandomized, so ``make test`` is repeatable.

Requests the stubs cannot build go through a raw channel (bytes in, bytes out): strings that are
not UTF-8 in each string field a client fills, and arbitrary bytes. Each is INVALID_ARGUMENT
saying what could not be decoded, never UNKNOWN with an internal class name.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service_fixtures import (
    Services,
    generate,
    greedy,
    kv_cache_clean_after_each_test,
    pb,
    running_services,
)

NUM_KV_BLOCKS = 32
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
ODD_TEXT = st.text(
    st.characters(exclude_categories=("Cs",)), max_size=200
)  # anything UTF-8 can carry
PROMPT_TEXT = st.one_of(
    ODD_TEXT,
    st.integers(1, 200_000).map(lambda n: "ab " * n),  # up to 600 KB, far past max_model_len
    st.sampled_from(["\x00", "\ufeff", "\u202e", "🙂" * 50, "{{ raise }}", "<|im_end|>"]),
)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "wizard", "", "USER", "\x00"])
CHAT = st.builds(
    pb.Chat,
    messages=st.lists(st.builds(pb.ChatMessage, role=ROLES, content=ODD_TEXT), max_size=4),
)
TOKEN_IDS = st.builds(
    pb.TokenIds, ids=st.lists(st.one_of(UINT32, st.integers(0, 2100)), max_size=600)
)
STOP = st.one_of(st.lists(ODD_TEXT, max_size=5), st.lists(st.just("x"), min_size=60, max_size=2000))

_ = kv_cache_clean_after_each_test
pytestmark = pytest.mark.usefixtures("kv_cache_clean_after_each_test")


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


@st.composite
def sampling_params(draw: st.DrawFn) -> pb.SamplingParams:
    fields = {
        "temperature": draw(optional(st.one_of(ANY_FLOAT, st.floats(0, 2)))),
        "top_p": draw(optional(ANY_FLOAT)),
        "top_k": draw(optional(st.one_of(INT32, st.integers(-2, 50)))),
        "min_p": draw(optional(ANY_FLOAT)),
        "seed": draw(optional(UINT64)),
        "max_tokens": draw(optional(st.one_of(INT32, st.integers(-1, 12)))),
        "min_tokens": draw(optional(st.one_of(INT32, st.integers(0, 4)))),
        "ignore_eos": draw(optional(st.booleans())),
        "logprobs": draw(optional(st.one_of(INT32, st.integers(0, 21)))),
        "detokenize": draw(optional(st.booleans())),
    }
    params = pb.SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    params.stop.extend(draw(STOP))
    params.stop_token_ids.extend(
        draw(st.lists(st.one_of(UINT32, st.integers(0, 2100)), max_size=8))
    )
    return params


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), ODD_TEXT, st.just("r" * 300))),
        stream=draw(st.booleans()),
    )
    if draw(st.booleans()):
        request.sampling.CopyFrom(draw(sampling_params()))
    which = draw(st.sampled_from(["text", "token_ids", "chat", None]))
    if which == "text":
        request.text = draw(PROMPT_TEXT)
    elif which == "token_ids":
        request.token_ids.CopyFrom(draw(TOKEN_IDS))
    elif which == "chat":
        request.chat.CopyFrom(draw(CHAT))
    return request


@st.composite
def plausible_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """In-range sampling and a non-empty prompt of odd Unicode: mostly answered OK."""
    sampling = pb.SamplingParams(
        temperature=draw(st.floats(0, 2)),
        top_p=draw(st.floats(0.01, 1)),
        top_k=draw(st.sampled_from([-1, 1, 5, 2**31 - 1])),
        min_p=draw(st.floats(0, 1)),
        seed=draw(st.integers(0, 2**63 - 1)),
        max_tokens=draw(st.integers(1, 12)),
        logprobs=draw(st.integers(0, 20)),
        stop=draw(st.lists(ODD_TEXT.filter(bool), max_size=3)),
    )
    prompt = draw(ODD_TEXT.filter(lambda t: t.strip() != ""))
    return pb.GenerateRequest(text=prompt, sampling=sampling, stream=draw(st.booleans()))


ANY_REQUEST = st.one_of(generate_requests(), plausible_requests())


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("fuzz")
    with running_services(tiny_model_dir, run_dir, NUM_KV_BLOCKS) as services:
        yield services


@pytest.fixture(scope="module")
def reference_ids(services: Services) -> list[int]:
    return list(generate(services.stub, text="Hello", sampling=greedy(6))[-1].complete.output_ids)


def status_of(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def test_any_generate_request_is_answered_ok_or_invalid_argument(
    services: Services, reference_ids: list[int]
) -> None:
    seen: set[grpc.StatusCode] = set()

    @FUZZ
    @given(request=ANY_REQUEST)
    def check(request: pb.GenerateRequest) -> None:
        code, details = status_of(lambda: list(services.stub.Generate(request, timeout=60)))
        assert code in ALLOWED, f"{code.name}: {details}"
        seen.add(code)

    check()
    assert seen == ALLOWED  # the generator reaches both answers
    assert_still_serving(services, reference_ids)


def test_any_tokenize_request_is_answered_ok_or_invalid_argument(
    services: Services, reference_ids: list[int]
) -> None:
    @FUZZ
    @given(text=optional(PROMPT_TEXT), chat=CHAT)
    def check(text: str | None, chat: pb.Chat) -> None:
        request = (
            pb.TokenizeRequest(text=text) if text is not None else pb.TokenizeRequest(chat=chat)
        )
        code, details = status_of(lambda: services.stub.Tokenize(request, timeout=30))
        assert code in ALLOWED, f"{code.name}: {details}"

    check()
    assert_still_serving(services, reference_ids)


MARK = "@@@@"  # four ASCII bytes in a valid request, swapped for four that are not UTF-8
NOT_UTF8 = b"\xff\xfe\xc0\x80"
USER_SAYS_MARK = pb.Chat(messages=[pb.ChatMessage(role="user", content=MARK)])
NOT_UTF8_REQUESTS = {  # method, request with MARK in one string field, that field as named
    "text": ("Generate", pb.GenerateRequest(text=MARK, sampling=greedy(2)), "text"),
    "stop": (
        "Generate",
        pb.GenerateRequest(text="Hi", sampling=greedy(2, stop=["ok", MARK])),
        "sampling.stop[1]",
    ),
    "chat_content": (
        "Generate",
        pb.GenerateRequest(chat=USER_SAYS_MARK, sampling=greedy(2)),
        "chat.messages[0].content",
    ),
    "request_id": ("Generate", pb.GenerateRequest(request_id=MARK, text="Hi"), "request_id"),
    "tokenize_text": ("Tokenize", pb.TokenizeRequest(text=MARK), "text"),
    "tokenize_chat_content": (
        "Tokenize",
        pb.TokenizeRequest(chat=USER_SAYS_MARK),
        "chat.messages[0].content",
    ),
    "abort_request_ids": ("Abort", pb.AbortRequest(request_ids=["a", MARK]), "request_ids[1]"),
}  # fmt: skip


def with_invalid_utf8(request: pb.GenerateRequest | pb.TokenizeRequest | pb.AbortRequest) -> bytes:
    data = request.SerializeToString()
    assert data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), NOT_UTF8)  # same length: every length prefix still holds


def raw_status(services: Services, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    """Send ``data`` as the request bytes of ``method``, past the stubs' serializer."""
    path = f"/nanoserve.v1.Generation/{method}"
    if method == "Generate":  # server streaming
        stream = services.channel.unary_stream(path, None, None)
        return status_of(lambda: list(stream(data, timeout=30)))
    unary = services.channel.unary_unary(path, None, None)
    return status_of(lambda: unary(data, timeout=30))


NOT_UTF8_CASES = [  # each Generate case streamed and not
    pytest.param(case, stream, id=f"{case}-stream" if stream else case)
    for case, (method, _, _) in NOT_UTF8_REQUESTS.items()
    for stream in ((False, True) if method == "Generate" else (False,))
]


@pytest.mark.parametrize(("case", "stream"), NOT_UTF8_CASES)
def test_a_string_that_is_not_utf8_is_invalid_argument_naming_the_field(
    services: Services, reference_ids: list[int], case: str, stream: bool
) -> None:
    method, request, field = NOT_UTF8_REQUESTS[case]
    if stream:
        streamed = pb.GenerateRequest(stream=True)
        streamed.MergeFrom(request)
        request = streamed
    code, details = raw_status(services, method, with_invalid_utf8(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert "could not be decoded" in details and f"{field} is not valid UTF-8" in details
    assert "<class" not in details and "DecodeError" not in details
    assert_still_serving(services, reference_ids)


def test_bytes_that_are_not_a_message_are_invalid_argument(
    services: Services, reference_ids: list[int]
) -> None:
    truncated = pb.GenerateRequest(text="Hello").SerializeToString()[:-2]
    code, details = raw_status(services, "Generate", truncated)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert "could not be decoded" in details and "nanoserve.v1.GenerateRequest" in details
    assert "<class" not in details
    assert_still_serving(services, reference_ids)


def test_any_bytes_are_answered_ok_or_invalid_argument(
    services: Services, reference_ids: list[int]
) -> None:
    @FUZZ
    @given(data=st.binary(max_size=64), method=st.sampled_from(["Generate", "Tokenize", "Abort"]))
    def check(data: bytes, method: str) -> None:
        code, details = raw_status(services, method, data)
        assert code in ALLOWED | {grpc.StatusCode.NOT_FOUND}, f"{code.name}: {details}"
        assert "<class" not in details

    check()
    assert_still_serving(services, reference_ids)


def assert_still_serving(services: Services, reference_ids: list[int]) -> None:
    done = generate(services.stub, text="Hello", sampling=greedy(6))[-1].complete
    assert list(done.output_ids) == reference_ids
    log = services.scheduler.log_path.read_text(errors="replace")  # type: ignore[union-attr]
    assert "Traceback" not in log and "worker lost" not in log
