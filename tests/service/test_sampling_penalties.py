"""Penalties and logit bias end to end: real worker and scheduler processes, real gRPC channels.

The checkpoint is written by transformers (weights large enough that greedy choices are no
near-ties), and transformers' own ``generate`` is the reference: ``repetition_penalty=`` for the
repetition penalty, a logits processor of OpenAI's definition for presence and frequency. Both
APIs are checked: nanoserve.v1 and vLLM's engine protocol (the gateway's).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc
from transformers import LogitsProcessor, LogitsProcessorList, Qwen3ForCausalLM

from tests.conftest import copy_tokenizer
from tests.service_fixtures import Services, generate, greedy, pb, running_services
from tests.unit.test_llm_vs_transformers import LLM_VOCAB, SHAPES, write_checkpoint

NUM_TOKENS = 24
PROMPT = [5, 17, 5, 17, 99, 5, 250, 17]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("penalties_model")
    write_checkpoint(out, LLM_VOCAB(tiny_model_dir), SHAPES["gqa2_headdim32_tied"], seed=3)
    copy_tokenizer(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def services(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with running_services(model_dir, tmp_path_factory.mktemp("penalties_run"), 64) as services:
        yield services


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> Qwen3ForCausalLM:
    model = Qwen3ForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


class OpenAIPenalties(LogitsProcessor):
    """Presence and frequency penalties over the generated tokens (OpenAI's definition)."""

    def __init__(self, num_prompt_tokens: int, presence: float, frequency: float) -> None:
        self.num_prompt_tokens, self.presence, self.frequency = (
            num_prompt_tokens,
            presence,
            frequency,
        )

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row in range(len(scores)):
            counts = torch.bincount(
                input_ids[row, self.num_prompt_tokens :], minlength=scores.shape[1]
            )
            scores[row] -= self.frequency * counts + self.presence * (counts > 0)
        return scores


def hf_generate(model: Qwen3ForCausalLM, **kwargs: object) -> list[int]:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NUM_TOKENS,
            min_new_tokens=NUM_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(PROMPT) :].tolist()


def nanoserve_ids(services: Services, **sampling: object) -> list[int]:
    request = dict(token_ids=pb.TokenIds(ids=PROMPT), sampling=greedy(NUM_TOKENS, **sampling))
    complete = generate(services.stub, **request)[-1].complete
    return list(complete.output_ids)


def vllm_ids(services: Services, **sampling: object) -> list[int]:
    engine = vllm_engine_pb2_grpc.VllmEngineStub(services.channel)
    params = vpb.SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    for name, value in sampling.items():
        if isinstance(value, dict):
            getattr(params, name).update(value)
        else:
            setattr(params, name, value)
    request = vpb.GenerateRequest(
        tokenized=vpb.TokenizedInput(input_ids=PROMPT), sampling_params=params
    )
    return list(list(engine.Generate(request, timeout=60))[-1].complete.output_ids)


def test_a_strong_repetition_penalty_changes_greedy_output_as_transformers_does(
    services: Services, hf_model: Qwen3ForCausalLM
) -> None:
    plain = nanoserve_ids(services, ignore_eos=True)
    assert plain == hf_generate(hf_model)  # the control: the same greedy tokens unpenalized
    penalized = nanoserve_ids(services, ignore_eos=True, repetition_penalty=3.0)
    assert penalized != plain
    assert penalized == hf_generate(hf_model, repetition_penalty=3.0)
    assert vllm_ids(services, repetition_penalty=3.0) == penalized


def test_presence_and_frequency_penalties_match_openais_definition_in_transformers(
    services: Services, hf_model: Qwen3ForCausalLM
) -> None:
    penalties = dict(presence_penalty=1.5, frequency_penalty=2.0)
    got = nanoserve_ids(services, ignore_eos=True, **penalties)
    processor = OpenAIPenalties(len(PROMPT), presence=1.5, frequency=2.0)
    assert got == hf_generate(hf_model, logits_processor=LogitsProcessorList([processor]))
    assert got != nanoserve_ids(services, ignore_eos=True)
    assert vllm_ids(services, **penalties) == got


def test_a_logit_bias_of_100_forces_its_token_and_of_minus_100_bans_it(services: Services) -> None:
    plain = nanoserve_ids(services, ignore_eos=True)
    forced = nanoserve_ids(services, ignore_eos=True, logit_bias={123: 100.0})
    assert forced == [123] * NUM_TOKENS
    banned = nanoserve_ids(services, ignore_eos=True, logit_bias={plain[0]: -100.0})
    assert banned[0] != plain[0] and plain[0] not in banned
    assert vllm_ids(services, logit_bias={123: 100.0}) == forced


@pytest.mark.parametrize(
    ("sampling", "named"),
    [
        (dict(logit_bias={10**6: 1.0}), "sampling.logit_bias=1000000 is invalid"),
        (dict(logit_bias={7: 150.0}), "sampling.logit_bias[7]=150.0 is invalid"),
        (dict(repetition_penalty=-1.0), "sampling.repetition_penalty=-1.0 is invalid"),
        (dict(presence_penalty=3.0), "sampling.presence_penalty=3.0 is invalid"),
        (dict(frequency_penalty=-2.5), "sampling.frequency_penalty=-2.5 is invalid"),
    ],
)
def test_an_out_of_range_penalty_or_bias_is_invalid_argument_naming_it(
    services: Services, sampling: dict, named: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        nanoserve_ids(services, **sampling)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        vllm_ids(services, **sampling)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named.replace("sampling.", "sampling_params.") in error.value.details()
