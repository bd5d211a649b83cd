"""The offline LLM generates, token for token, what transformers' generate does (greedy, float32).

Checkpoints are written by transformers itself; the engine must agree with it on several model
shapes and under preemption, chunked prefill and prefix caching.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from bench.hf_reference import hf_greedy
from nanoserve import LLM, SamplingParams
from tests.conftest import copy_tokenizer

NUM_NEW_TOKENS = 32
SHAPES = {
    "gqa2_headdim32_tied": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True
    ),
    "one_kv_head_headdim16_untied": dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False
    ),
    "mha_headdim64_untied": dict(
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False
    ),
}


def write_checkpoint(out: Path, vocab_size: int, shape: dict, seed: int) -> Path:
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        initializer_range=0.2,  # large enough that greedy choices are not near-ties
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    return out


def reference_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = Qwen3ForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    )
    return hf_greedy(model.eval(), prompts, NUM_NEW_TOKENS)


def make_prompts(vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 7, 16, 33, 64, 129, 200, 300]
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def case(request, tiny_model_dir, tmp_path_factory):
    vocab_size = LLM_VOCAB(tiny_model_dir)
    model_dir = write_checkpoint(
        tmp_path_factory.mktemp(request.param),
        vocab_size,
        SHAPES[request.param],
        seed=len(request.param),
    )
    copy_tokenizer(tiny_model_dir, model_dir)
    prompts = make_prompts(vocab_size, seed=1)
    return model_dir, prompts, reference_greedy(model_dir, prompts)


def LLM_VOCAB(tiny_model_dir: Path) -> int:
    import json

    return json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def generate_ids(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [out["token_ids"] for out in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_greedy_batch_equals_transformers(case) -> None:
    model_dir, prompts, expected = case
    llm = LLM(str(model_dir), device="cpu", block_size=16, num_kv_blocks=256)
    assert generate_ids(llm, prompts) == expected


def test_tiny_kv_cache_preempts_and_output_is_unchanged(case) -> None:
    model_dir, prompts, expected = case
    # 24 blocks of 16 tokens: fewer than the batch needs, more than the longest sequence (21).
    llm = LLM(str(model_dir), device="cpu", block_size=16, num_kv_blocks=24)
    assert generate_ids(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0


def test_small_token_budget_chunks_prefill_and_output_is_unchanged(case) -> None:
    model_dir, prompts, expected = case
    llm = LLM(
        str(model_dir),
        device="cpu",
        block_size=16,
        num_kv_blocks=256,
        max_num_batched_tokens=64,
        max_num_seqs=8,
    )
    steps = []
    original_step = llm.worker.step
    llm.worker.step = lambda plan: steps.append(plan) or original_step(plan)  # type: ignore[method-assign]
    assert generate_ids(llm, prompts) == expected
    assert any(max(plan.num_new_tokens) > 1 and sum(plan.num_new_tokens) == 64 for plan in steps)
    longest = max(len(p) for p in prompts)
    assert all(sum(plan.num_new_tokens) <= 64 for plan in steps) and longest > 64


def test_shared_prefix_hits_the_cache_and_output_is_unchanged(case) -> None:
    model_dir, prompts, _ = case
    prefix = prompts[-1][:160]
    shared = [prefix + p[:20] for p in prompts[:4]]
    expected = reference_greedy(model_dir, shared)
    llm = LLM(str(model_dir), device="cpu", block_size=16, num_kv_blocks=256)
    assert generate_ids(llm, shared[:1]) == expected[:1]
    hits_before = llm.engine.scheduler.block_manager.num_cache_hit_tokens
    assert generate_ids(llm, shared) == expected
    assert llm.engine.scheduler.block_manager.num_cache_hit_tokens - hits_before >= 160 * 4


def test_synchronous_scheduling_gives_the_same_output(case) -> None:
    model_dir, prompts, expected = case
    llm = LLM(str(model_dir), device="cpu", block_size=16, num_kv_blocks=24, async_scheduling=False)
    assert generate_ids(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0


def test_two_plans_in_flight_give_the_same_output_under_preemption(case) -> None:
    model_dir, prompts, expected = case
    llm = LLM(str(model_dir), device="cpu", block_size=16, num_kv_blocks=24, pipeline_depth=2)
    assert generate_ids(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    manager = llm.engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks
