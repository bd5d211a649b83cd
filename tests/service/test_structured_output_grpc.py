"""Structured output through the real services (a CPU worker and the scheduler over loopback
gRPC), on the tiny random model: nanoserve.v1 and vLLM's engine protocol, streaming and not."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from tests.service_fixtures import Services, generate, pb, running_services
from tests.structured_cases import (
    CHOICES,
    MAX_TOKENS,
    REGEX,
    SCHEMA_TEXT,
    assert_matches_regex,
    assert_matches_schema,
)


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with running_services(tiny_model_dir, tmp_path_factory.mktemp("structured"), 256) as services:
        yield services


def sampling(i: int, **constraint: object) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=0.0 if i % 2 == 0 else 1.0, seed=i, max_tokens=MAX_TOKENS, **constraint
    )


def text_of(responses: list[pb.GenerateResponse], stream: bool) -> str:
    """The Complete's text; streamed, also checked to be the chunks' texts joined."""
    complete = responses[-1].complete
    assert complete.finish_reason == pb.STOP
    if stream:
        chunks = [r.chunk for r in responses[:-1]]
        assert len(chunks) > 1 and "".join(c.text for c in chunks) == complete.text
        assert [t for c in chunks for t in c.token_ids] == list(complete.output_ids)
    return complete.text


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates_streamed_or_not(services: Services, stream: bool) -> None:
    def run(i: int) -> str:
        responses = generate(
            services.stub, text=f"item {i}", sampling=sampling(i, json_schema=SCHEMA_TEXT),
            stream=stream,
        )  # fmt: skip
        return text_of(responses, stream)

    with ThreadPoolExecutor(8) as pool:
        for text in pool.map(run, range(8)):
            assert_matches_schema(text)


def test_regex_choice_and_free_requests_share_batches(services: Services) -> None:
    requests = [("regex", {"regex": REGEX}), ("choice", {"choice": pb.Choice(choices=CHOICES)})]
    requests = requests * 3 + [("free", {})] * 3

    def run(i: int) -> tuple[str, pb.Complete]:
        kind, constraint = requests[i]
        params = sampling(i, **constraint)
        if kind == "free":
            params = pb.SamplingParams(max_tokens=10, ignore_eos=True)
        return kind, generate(services.stub, text="pick:", sampling=params)[-1].complete

    with ThreadPoolExecutor(len(requests)) as pool:
        for kind, complete in pool.map(run, range(len(requests))):
            if kind == "regex":
                assert_matches_regex(complete.text)
            elif kind == "choice":
                assert complete.text in CHOICES
            else:
                assert complete.finish_reason == pb.LENGTH and len(complete.output_ids) == 10


@pytest.mark.parametrize(
    ("constraint", "details"),
    [
        ({"regex": "a(b"}, "sampling.regex is invalid: Regex parsing error"),
        ({"json_schema": '{"type": "nope"}'}, "sampling.json_schema is invalid: Unsupported type"),
        ({"grammar": "root ::= foo"}, "sampling.grammar is invalid: EBNF parser error"),
        ({"choice": pb.Choice()}, "sampling.choice.choices=[] is invalid"),
    ],
)
def test_a_bad_constraint_is_invalid_argument_with_the_compilers_message(
    services: Services, constraint: dict[str, object], details: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        generate(services.stub, text="x", sampling=pb.SamplingParams(**constraint))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details in raised.value.details()
    assert services.status().num_waiting_requests == 0


def test_vllm_engine_protocol_maps_its_constraint_fields(services: Services) -> None:
    engine = vllm_engine_pb2_grpc.VllmEngineStub(services.channel)
    ids = list(services.stub.Tokenize(pb.TokenizeRequest(text="json:")).token_ids)
    request = vpb.GenerateRequest(
        tokenized=vpb.TokenizedInput(input_ids=ids),
        sampling_params=vpb.SamplingParams(
            temperature=0.0, max_tokens=MAX_TOKENS, json_schema=SCHEMA_TEXT
        ),
    )
    complete = list(engine.Generate(request, timeout=60))[-1].complete
    assert complete.finish_reason == "stop"
    detok = generate(  # the same request through nanoserve.v1, which detokenizes
        services.stub, token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, json_schema=SCHEMA_TEXT),
    )[-1].complete  # fmt: skip
    assert list(detok.output_ids) == list(complete.output_ids)
    assert_matches_schema(detok.text)
    bad = vpb.GenerateRequest(
        tokenized=vpb.TokenizedInput(input_ids=ids),
        sampling_params=vpb.SamplingParams(max_tokens=4, regex="a(b"),
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(engine.Generate(bad, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling_params.regex is invalid: Regex parsing error" in raised.value.details()
