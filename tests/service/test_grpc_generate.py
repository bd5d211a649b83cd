"""Generation through the real services: one CPU worker process and the scheduler, over gRPC.

Greedy output must match the in-process LLM and transformers token for token (on the random tiny
checkpoint and on the committed trained one); streams must add up
to their Complete message and to what the same request gives without streaming; many concurrent clients must all finish while the scheduler preempts
and hits the prefix cache; a cancelled or expired stream must give its KV blocks back at once.
"""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import grpc
import pytest

from tests.service_fixtures import (
    BLOCK_SIZE,
    Services,
    generate,
    generation_pb2_grpc,
    greedy,
    pb,
    running_services,
    wait_for,
)

NUM_KV_BLOCKS = 40  # small: 64 clients cannot all fit, so the scheduler must preempt
TRAINED_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tiny_trained"
PROMPTS = ["Once upon a time", "The quick brown fox", "def fibonacci(n):", "Hello"]


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("generate_services")
    with running_services(tiny_model_dir, run_dir, NUM_KV_BLOCKS) as services:
        yield services


def complete_of(responses: list[pb.GenerateResponse]) -> pb.Complete:
    assert responses[-1].HasField("complete")
    return responses[-1].complete


def test_greedy_outputs_equal_the_offline_llm_and_transformers(services: Services) -> None:
    from nanoserve import LLM, SamplingParams

    llm = LLM(str(services.model_dir), block_size=BLOCK_SIZE, num_kv_blocks=NUM_KV_BLOCKS)
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    reference = transformers_greedy(services.model_dir, [llm.tokenizer.encode(p) for p in PROMPTS])
    for prompt, expected, expected_ids in zip(PROMPTS, offline, reference):
        done = complete_of(generate(services.stub, text=prompt, sampling=greedy(12)))
        assert list(done.output_ids) == expected["token_ids"] == expected_ids
        assert done.text == expected["text"]


def test_trained_model_greedy_outputs_equal_transformers(tmp_path: Path) -> None:
    with running_services(TRAINED_MODEL_DIR, tmp_path / "run", NUM_KV_BLOCKS) as trained:
        stub = trained.stub
        prompt_ids = [list(stub.Tokenize(pb.TokenizeRequest(text=p)).token_ids) for p in PROMPTS]
        reference = transformers_greedy(TRAINED_MODEL_DIR, prompt_ids)
        for prompt, expected_ids in zip(PROMPTS, reference):
            done = complete_of(generate(stub, text=prompt, sampling=greedy(12)))
            assert list(done.output_ids) == expected_ids


def transformers_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """12 greedy tokens per prompt from transformers' own Qwen3, stopping at EOS as the engine does."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def test_token_ids_and_chat_inputs_match_their_text(services: Services) -> None:
    stub = services.stub
    tokenized = stub.Tokenize(pb.TokenizeRequest(text=PROMPTS[0]), timeout=10).token_ids
    by_text = complete_of(generate(stub, text=PROMPTS[0], sampling=greedy(6)))
    by_ids = complete_of(generate(stub, token_ids=pb.TokenIds(ids=tokenized), sampling=greedy(6)))
    assert by_ids.output_ids == by_text.output_ids
    assert by_ids.usage.prompt_tokens == len(tokenized)

    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="Hi there")])
    chat_ids = stub.Tokenize(pb.TokenizeRequest(chat=chat), timeout=10).token_ids
    by_chat = complete_of(generate(stub, chat=chat, sampling=greedy(6)))
    by_chat_ids = complete_of(
        generate(stub, token_ids=pb.TokenIds(ids=chat_ids), sampling=greedy(6))
    )
    assert by_chat.output_ids == by_chat_ids.output_ids
    assert by_chat.usage.prompt_tokens == len(chat_ids)


def test_stream_sends_chunks_that_add_up_to_the_complete_message(services: Services) -> None:
    sampling = greedy(10, ignore_eos=True, logprobs=2)
    responses = generate(services.stub, text=PROMPTS[1], sampling=sampling, stream=True)
    chunks = [r.chunk for r in responses[:-1]]
    done = complete_of(responses)
    assert chunks and all(r.HasField("chunk") for r in responses[:-1])
    assert [t for c in chunks for t in c.token_ids] == list(done.output_ids)
    assert "".join(c.text for c in chunks) == done.text
    assert len(done.output_ids) == done.usage.completion_tokens == 10
    assert done.finish_reason == pb.LENGTH
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in logprobs] == list(done.output_ids)
    assert all(len(lp.top_token_ids) == 2 and lp.logprob <= 0 for lp in logprobs)
    assert all(lp.top_token_ids[0] == lp.token_id for lp in logprobs)  # greedy takes the top one


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_streaming_and_non_streaming_give_the_same_tokens_and_text(
    services: Services, temperature: float
) -> None:
    for seed, prompt in enumerate(PROMPTS):
        sampling = pb.SamplingParams(
            temperature=temperature, top_k=20, seed=seed, max_tokens=12, ignore_eos=True
        )
        whole = complete_of(generate(services.stub, text=prompt, sampling=sampling))
        responses = generate(services.stub, text=prompt, sampling=sampling, stream=True)
        streamed = [t for r in responses[:-1] for t in r.chunk.token_ids]
        assert streamed == list(complete_of(responses).output_ids) == list(whole.output_ids)
        assert "".join(r.chunk.text for r in responses[:-1]) == whole.text
        assert complete_of(responses).finish_reason == whole.finish_reason == pb.LENGTH


def test_without_stream_only_the_complete_message_is_sent(services: Services) -> None:
    responses = generate(services.stub, text=PROMPTS[2], sampling=greedy(5, ignore_eos=True))
    assert len(responses) == 1
    assert len(complete_of(responses).output_ids) == 5


def test_a_stop_string_ends_the_text_before_it(services: Services) -> None:
    free = complete_of(
        generate(services.stub, text=PROMPTS[3], sampling=greedy(12, ignore_eos=True))
    )
    stop = free.text[3:6]
    done = complete_of(generate(services.stub, text=PROMPTS[3], sampling=greedy(12, stop=[stop])))
    assert done.finish_reason == pb.STOP
    assert done.text == free.text[: free.text.index(stop)]


def test_64_concurrent_streams_finish_while_preempting_and_hitting_the_prefix_cache(
    services: Services,
) -> None:
    before = services.status()
    rng = random.Random(0)
    shared_prefix = [rng.randrange(10, 2000) for _ in range(2 * BLOCK_SIZE)]
    requests = []
    for i in range(64):
        suffix = [rng.randrange(10, 2000) for _ in range(rng.randrange(0, 30))]
        prompt = shared_prefix + suffix if i % 2 == 0 else suffix + [7] + shared_prefix[:9]
        max_tokens = rng.randrange(4, 25)
        requests.append(
            pb.GenerateRequest(
                request_id=f"client-{i}",
                token_ids=pb.TokenIds(ids=prompt),
                sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=i),
                stream=True,
            )
        )
    results = asyncio.run(stream_all(services.addr, requests))
    for request, (num_chunk_tokens, done) in zip(requests, results):
        assert num_chunk_tokens == len(done.output_ids) == request.sampling.max_tokens
        assert done.usage.prompt_tokens == len(request.token_ids.ids)
    after = wait_for(lambda: idle_status(services), 5, "every block to be free again")
    assert after.num_preemptions > before.num_preemptions
    assert after.num_prefix_cache_hit_tokens > before.num_prefix_cache_hit_tokens
    assert after.free_blocks == after.total_blocks == NUM_KV_BLOCKS


async def stream_all(
    addr: str, requests: list[pb.GenerateRequest]
) -> list[tuple[int, pb.Complete]]:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def one(request: pb.GenerateRequest) -> tuple[int, pb.Complete]:
            num_tokens = 0
            async for response in stub.Generate(request, timeout=120):
                if response.HasField("chunk"):
                    num_tokens += len(response.chunk.token_ids)
                else:
                    return num_tokens, response.complete
            raise AssertionError("the stream ended without a Complete message")

        return await asyncio.gather(*(one(r) for r in requests))


def idle_status(services: Services) -> pb.GetServerStatusResponse | None:
    status = services.status()
    idle = status.num_running_requests == status.num_waiting_requests == 0
    return status if idle and status.free_blocks == status.total_blocks else None


def long_request(request_id: str, num_prompt_tokens: int, max_tokens: int) -> pb.GenerateRequest:
    rng = random.Random(request_id)
    prompt = [rng.randrange(10, 2000) for _ in range(num_prompt_tokens)]
    return pb.GenerateRequest(
        request_id=request_id,
        token_ids=pb.TokenIds(ids=prompt),
        sampling=greedy(max_tokens, ignore_eos=True),
        stream=True,
    )


def test_cancelling_a_stream_frees_its_blocks_while_others_go_on(services: Services) -> None:
    stub = services.stub
    others = [stub.Generate(long_request(f"other-{i}", 5, 120), timeout=60) for i in range(2)]
    others_done: list[pb.Complete] = []
    readers = [threading.Thread(target=lambda s=s: others_done.append(drain(s))) for s in others]
    for reader in readers:
        reader.start()
    big_prompt_blocks = 300 // BLOCK_SIZE  # full blocks the cancelled stream holds at least
    big = stub.Generate(long_request("big", 300, 300), timeout=60)
    next(big), next(big)  # it is decoding
    before = services.status()
    assert before.num_running_requests == 3
    big.cancel()
    after = wait_for(
        lambda: (s := services.status()).num_running_requests == 2 and s, 5, "the abort"
    )
    used_before = before.total_blocks - before.free_blocks
    used_after = after.total_blocks - after.free_blocks
    assert used_after <= used_before - big_prompt_blocks + 4  # others may have grown a little
    for reader in readers:
        reader.join(60)
    assert [len(done.output_ids) for done in others_done] == [120, 120]
    assert wait_for(lambda: idle_status(services), 5, "every block to be free again")


def drain(stream: grpc.Call) -> pb.Complete:
    return [r for r in stream][-1].complete


def test_a_passed_deadline_aborts_the_request_and_frees_its_blocks(services: Services) -> None:
    with pytest.raises(grpc.RpcError) as error:
        list(services.stub.Generate(long_request("late", 40, 500), timeout=0.5))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: idle_status(services), 5, "every block to be free again")


def test_abort_ends_the_stream_with_finish_reason_abort(services: Services) -> None:
    stream = services.stub.Generate(long_request("to-abort", 8, 500), timeout=60)
    next(stream)
    reply = services.stub.Abort(pb.AbortRequest(request_ids=["to-abort"]), timeout=5)
    assert list(reply.aborted_ids) == ["to-abort"]
    done = drain(stream)
    assert done.finish_reason == pb.ABORT
    assert 1 <= done.usage.completion_tokens < 1000
    assert wait_for(lambda: idle_status(services), 5, "every block to be free again")
