"""vLLM's engine protocol: n > 1 parallel samples and GetTokenizer, over a raw gRPC channel.

Real processes (a CPU worker and the scheduler). n samples are n requests with derived seeds
(seed + index, as vLLM's child requests): each sample equals a nanoserve.v1 request with its seed,
every response carries its sample's index, and the later samples hit the first one's prompt
blocks in the prefix cache (the hit counter rises by exactly the shareable full blocks). Aborting
the request's id aborts every sample. GetTokenizer streams a zip that loads as the same tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from smg_grpc_proto.generated import common_pb2 as cpb
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc
from transformers import PreTrainedTokenizerFast

from tests.service_fixtures import (
    BLOCK_SIZE,
    Services,
    assert_kv_cache_clean,
    generate,
    pb,
    running_services,
)

NUM_TOKENS = 8
SEED = 11


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    run_dir = tmp_path_factory.mktemp("vllm_samples")
    with running_services(tiny_model_dir, run_dir, 128) as services:
        yield services


@pytest.fixture
def engine(services: Services) -> vllm_engine_pb2_grpc.VllmEngineStub:
    return vllm_engine_pb2_grpc.VllmEngineStub(services.channel)


def fresh_prompt(num_tokens: int, seed: int) -> list[int]:
    """Token ids no other test sends, so nothing is in the prefix cache for them yet."""
    rng = random.Random(seed)
    return [rng.randrange(100, 1000) for _ in range(num_tokens)]


def sampled(ids: list[int], n: int, stream: bool = False, **request: object) -> vpb.GenerateRequest:
    params = vpb.SamplingParams(
        temperature=1.0, seed=SEED, max_tokens=NUM_TOKENS, ignore_eos=True, n=n
    )
    return vpb.GenerateRequest(
        tokenized=vpb.TokenizedInput(input_ids=ids),
        sampling_params=params,
        stream=stream,
        **request,
    )


def nanoserve_sample(services: Services, ids: list[int], seed: int) -> list[int]:
    sampling = pb.SamplingParams(temperature=1.0, seed=seed, max_tokens=NUM_TOKENS, ignore_eos=True)
    responses = generate(services.stub, token_ids=pb.TokenIds(ids=ids), sampling=sampling)
    return list(responses[-1].complete.output_ids)


def hit_tokens(services: Services) -> int:
    return services.status().num_prefix_cache_hit_tokens


def test_n_samples_are_indexed_seeded_requests_that_share_the_prompts_full_blocks(
    services: Services, engine: vllm_engine_pb2_grpc.VllmEngineStub
) -> None:
    n, ids = 4, fresh_prompt(2 * BLOCK_SIZE + 5, seed=1)  # two full blocks, then a partial one
    before = hit_tokens(services)
    responses = list(engine.Generate(sampled(ids, n), timeout=120))
    # The first sample computes the prompt; each later one finds its 2 full blocks cached.
    assert hit_tokens(services) - before == (n - 1) * 2 * BLOCK_SIZE
    completes = [r.complete for r in responses]
    assert all(r.HasField("complete") for r in responses)
    assert [c.index for c in completes] == list(range(n))
    outputs = [list(c.output_ids) for c in completes]
    assert all(c.prompt_tokens == len(ids) for c in completes)
    assert [c.cached_tokens for c in completes] == [0] + [2 * BLOCK_SIZE] * (n - 1)
    for index, output in enumerate(outputs):
        assert output == nanoserve_sample(services, ids, SEED + index)
    assert len({tuple(o) for o in outputs}) > 1  # distinct seeds: the samples differ


def test_a_prompt_without_a_full_block_has_nothing_to_share(
    services: Services, engine: vllm_engine_pb2_grpc.VllmEngineStub
) -> None:
    ids = fresh_prompt(BLOCK_SIZE - 1, seed=2)
    before = hit_tokens(services)
    responses = list(engine.Generate(sampled(ids, 3), timeout=120))
    assert hit_tokens(services) == before
    assert sorted(r.complete.index for r in responses) == [0, 1, 2]


def test_streamed_samples_interleave_chunks_tagged_with_their_index(
    services: Services, engine: vllm_engine_pb2_grpc.VllmEngineStub
) -> None:
    n, ids = 3, fresh_prompt(BLOCK_SIZE + 3, seed=3)
    responses = list(engine.Generate(sampled(ids, n, stream=True), timeout=120))
    completes = {r.complete.index: r.complete for r in responses if r.HasField("complete")}
    assert sorted(completes) == list(range(n))
    for index in range(n):
        chunks = [r.chunk for r in responses if r.HasField("chunk") and r.chunk.index == index]
        streamed = [t for c in chunks for t in c.token_ids]
        assert streamed == list(completes[index].output_ids)
        assert len(streamed) == NUM_TOKENS
    assert responses[-1].HasField("complete")


def test_aborting_the_request_id_aborts_every_sample(
    services: Services, engine: vllm_engine_pb2_grpc.VllmEngineStub
) -> None:
    request = sampled(fresh_prompt(BLOCK_SIZE + 1, seed=4), 2, stream=True, request_id="many")
    request.sampling_params.max_tokens = 1000
    responses = engine.Generate(request, timeout=120)
    seen: set[int] = set()
    for response in responses:  # until both samples run
        seen.add(response.chunk.index)
        if seen == {0, 1}:
            break
    engine.Abort(vpb.AbortRequest(request_ids=["many"]), timeout=10)
    completes = [r.complete for r in responses if r.HasField("complete")]
    assert sorted(c.index for c in completes) == [0, 1]
    assert all(c.finish_reason == "abort" for c in completes)
    assert_kv_cache_clean(services)


def test_n_past_max_num_seqs_is_invalid_argument_naming_it(
    services: Services, engine: vllm_engine_pb2_grpc.VllmEngineStub
) -> None:
    import grpc

    with pytest.raises(grpc.RpcError) as error:
        list(engine.Generate(sampled([1, 2, 3], 100_000), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling_params.n=100000 is invalid" in error.value.details()


def test_get_tokenizer_streams_a_zip_of_the_model_directorys_tokenizer(
    services: Services, engine: vllm_engine_pb2_grpc.VllmEngineStub, tmp_path: Path
) -> None:
    chunks = list(engine.GetTokenizer(cpb.GetTokenizerRequest(), timeout=30))
    data = b"".join(c.data for c in chunks)
    assert [c.sha256 for c in chunks][:-1] == [""] * (len(chunks) - 1)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    for name in names:
        assert (tmp_path / name).read_bytes() == (services.model_dir / name).read_bytes()
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    ids = list(services.stub.Tokenize(pb.TokenizeRequest(text="Once upon a time")).token_ids)
    assert loaded.encode("Once upon a time", add_special_tokens=False) == ids
