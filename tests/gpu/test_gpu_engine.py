"""GPU engine checks: bf16 greedy agrees with transformers; CUDA graphs change nothing; a seeded
request's tokens do not depend on its batch-mate.

bf16 drifts: two correct bf16 implementations diverge once a near-tie flips a greedy choice, and
every later token follows the flip. We require the first ``AGREE_TOKENS`` tokens of every prompt
to match, and every divergence to be a near-tie in transformers' own logits: the two candidates'
logits differ by at most ``TIE_TOLERANCE`` of the largest logit's magnitude.
"""

from __future__ import annotations

import dataclasses
import gc
import random

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from bench.hf_reference import hf_greedy
from nanoserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu
AGREE_TOKENS = 4
TIE_TOLERANCE = 0.03
NUM_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = Qwen3Config(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        initializer_range=0.2,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gpu_ckpt")
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    rng = random.Random(0)
    prompts = [[rng.randrange(4096) for _ in range(n)] for n in (1, 5, 17, 64, 100, 257, 300, 513)]
    return out, prompts


@pytest.fixture(scope="module")
def engine_options(attention_backend) -> dict:
    """The GPU engine tests' common settings, on the session's attention backend."""
    return dict(
        device="cuda", block_size=16, max_num_seqs=16, num_kv_blocks=512,
        attention_backend=attention_backend,
    )  # fmt: skip


def hf_greedy_bf16(model_dir, prompts):
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    return hf_greedy(model, prompts, NUM_NEW_TOKENS)


GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def test_bf16_greedy_agrees_with_transformers_up_to_near_ties(checkpoint, engine_options) -> None:
    model_dir, prompts = checkpoint
    expected = hf_greedy_bf16(model_dir, prompts)
    llm = LLM(str(model_dir), **engine_options)
    print(f"attention backend: {llm.engine.info.attention_backend}")
    got = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    matched = [
        next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), NUM_NEW_TOKENS)
        for g, e in zip(got, expected)
    ]
    print(f"tokens matching transformers before the first difference: {matched}")
    assert min(matched) >= AGREE_TOKENS
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    for prompt, ours, theirs, n in zip(prompts, got, expected, matched):
        if n == NUM_NEW_TOKENS:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + theirs[:n]], device="cuda")).logits[0, -1].float()
        gap = (logits[theirs[n]] - logits[ours[n]]).item()
        print(
            f"divergence at token {n}: logit gap {gap:.4f} of max {logits.abs().max().item():.2f}"
        )
        assert gap <= TIE_TOLERANCE * logits.abs().max().item()


def generate_once(model_dir, prompts, params, engine_options, **options):
    """Generate with a fresh engine (``engine_options`` plus ``options``), then free its GPU
    memory for the next one. Returns the engine's outputs and its CUDA graphs (a list, empty
    when eager)."""
    llm = LLM(str(model_dir), **(engine_options | options))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    graphs = llm.worker.runner.graphs
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return outputs, graphs


def test_async_scheduling_output_equals_synchronous_output(checkpoint, engine_options) -> None:
    model_dir, prompts = checkpoint
    params = [
        SamplingParams(temperature=0.7, seed=i, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
        for i in range(len(prompts))
    ]
    with_async, _ = generate_once(model_dir, prompts, params, engine_options, async_scheduling=True)
    two_ahead, _ = generate_once(model_dir, prompts, params, engine_options, pipeline_depth=2)
    without, _ = generate_once(model_dir, prompts, params, engine_options, async_scheduling=False)
    assert with_async == two_ahead == without


def _mixed_params(n: int) -> list[SamplingParams]:
    """Greedy, seeded and unseeded sampling, one row with logprobs, one with top_k (drawn again
    after the graph), one under min_tokens (banned tokens): every sampling path."""
    params = []
    for i in range(n):
        options = {"temperature": 0.0} if i % 3 == 0 else {"temperature": 0.8}
        if i % 3 == 1:
            options["seed"] = i
        params.append(SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True, **options))
    params[1] = SamplingParams(max_tokens=NUM_NEW_TOKENS, logprobs=2, seed=5, temperature=0.8)
    params[2] = SamplingParams(max_tokens=NUM_NEW_TOKENS, top_k=5, seed=7, temperature=0.8)
    params[3] = SamplingParams(
        max_tokens=NUM_NEW_TOKENS, min_tokens=NUM_NEW_TOKENS, stop_token_ids=[1, 2]
    )
    return params


def _penalty_params(n: int) -> list[SamplingParams]:
    """Rows with penalties or a logit bias (re-sampled after the graph, their token in flight
    read on the device) beside plain greedy and seeded rows that must not notice them."""
    params = _mixed_params(n)
    params[0] = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, repetition_penalty=1.8)
    params[1] = SamplingParams(
        max_tokens=NUM_NEW_TOKENS, temperature=0.8, seed=3, frequency_penalty=1.0,
        presence_penalty=0.5,
    )  # fmt: skip
    params[-1] = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, logit_bias={7: 5.0})
    return params


SAMPLINGS = {"greedy": lambda n: GREEDY, "mixed": _mixed_params, "penalties": _penalty_params}


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
def test_cuda_graph_output_equals_eager_output(checkpoint, sampling, engine_options) -> None:
    model_dir, prompts = checkpoint
    params = SAMPLINGS[sampling](len(prompts))
    graphed, graphs = generate_once(model_dir, prompts, params, engine_options, enforce_eager=False)
    eager, no_graphs = generate_once(model_dir, prompts, params, engine_options, enforce_eager=True)
    assert graphs and not no_graphs
    assert [o["token_ids"] for o in graphed] == [o["token_ids"] for o in eager]


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
def test_prefill_graph_output_equals_eager_output(checkpoint, sampling, engine_options) -> None:
    """Steps of at most 256 tokens: every prefill, chunked and mixed step (up to 16 sequences)
    replays a prefill graph, with padded tokens and rows."""
    model_dir, prompts = checkpoint
    params = SAMPLINGS[sampling](len(prompts))
    options = engine_options | {"max_num_batched_tokens": 256}
    graphed, graphs = generate_once(model_dir, prompts, params, options, enforce_eager=False)
    eager, _ = generate_once(model_dir, prompts, params, options, enforce_eager=True)
    prefill = next(g for g in graphs if g.kind == "prefill")
    assert prefill.num_replays >= len(prompts) // 2
    assert [o["token_ids"] for o in graphed] == [o["token_ids"] for o in eager]


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
def test_wide_prefill_graph_output_equals_eager_output(
    checkpoint, sampling, engine_options
) -> None:
    """Three copies of the prompts (24 sequences) in steps of at most 1,024 tokens: chunks and
    new prompts beside more than 16 decoding sequences replay the wide prefill graphs (a row per
    sequence the engine runs)."""
    model_dir, prompts = checkpoint
    prompts = [p + [i] for i in range(3) for p in prompts]
    params = SAMPLINGS[sampling](len(prompts))
    options = engine_options | {"max_num_seqs": 32, "max_num_batched_tokens": 1024}
    graphed, graphs = generate_once(model_dir, prompts, params, options, enforce_eager=False)
    eager, _ = generate_once(model_dir, prompts, params, options, enforce_eager=True)
    wide = next(g for g in graphs if g.kind == "wide prefill")
    assert wide.rows == 32 and wide.num_replays >= 2
    assert [o["token_ids"] for o in graphed] == [o["token_ids"] for o in eager]


def test_programmatic_dependent_launch_changes_no_token(
    checkpoint, engine_options, monkeypatch
) -> None:
    """With PDL (kernels/pdl.py) a kernel starts before the one it reads from has ended and
    waits for it inside: a missing wait would read stale activations and change tokens."""
    from kernels import pdl

    model_dir, prompts = checkpoint
    params = _mixed_params(len(prompts))
    assert pdl.launch_options(torch.device("cuda"))["USE_PDL"]  # an H100/H200: it is on
    with_pdl, _ = generate_once(model_dir, prompts, params, engine_options)
    monkeypatch.setattr(pdl, "enabled", False)
    without, _ = generate_once(model_dir, prompts, params, engine_options)
    assert [o["token_ids"] for o in with_pdl] == [o["token_ids"] for o in without]


SEEDED_MATES = {
    "plain": SamplingParams(temperature=0.8),
    "top_k=20": SamplingParams(temperature=0.8, top_k=20),
    "top_p=0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "min_p=0.1": SamplingParams(temperature=0.8, min_p=0.1),
}
SEEDED_TOKENS = 48


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_a_seeded_request_generates_the_same_tokens_beside_any_mate(
    checkpoint, enforce_eager, engine_options
) -> None:
    """[seeded, mate A] against [seeded, mate B]: the batch size is fixed, only the mate's
    sampling differs (a plain mate takes the graph's kernel draw, a filtered one the redraw)."""
    model_dir, prompts = checkpoint
    llm = LLM(str(model_dir), **(engine_options | {"enforce_eager": enforce_eager}))
    failures = []
    for temperature in (0.0, 0.8):
        seeded = SamplingParams(
            temperature=temperature, seed=1234, max_tokens=SEEDED_TOKENS, ignore_eos=True
        )
        runs = {}
        for name, mate in SEEDED_MATES.items():
            mate = dataclasses.replace(mate, max_tokens=SEEDED_TOKENS, ignore_eos=True)
            outputs = llm.generate([prompts[3], prompts[4]], [seeded, mate], use_tqdm=False)
            runs[name] = outputs[0]["token_ids"]
        for name, tokens in runs.items():
            equal = sum(a == b for a, b in zip(tokens, runs["plain"]))
            print(f"seed=1234 T={temperature} beside {name}: {equal}/{SEEDED_TOKENS} tokens equal")
            if equal != SEEDED_TOKENS:
                failures.append((temperature, name, equal))
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    assert failures == []
