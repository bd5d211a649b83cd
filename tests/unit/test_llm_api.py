"""The offline API: input validation, seeded sampling, stop conditions, result shape."""

from __future__ import annotations

import pytest

from nanoserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(
        str(tiny_model_dir), device="cpu", block_size=16, num_kv_blocks=128, max_model_len=256
    )


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", SamplingParams(), "prompt"),
        ([], SamplingParams(), "prompt"),
        ([5] * 300, SamplingParams(), "max_model_len"),
        ("hi", SamplingParams(max_tokens=0), "max_tokens"),
        ("hi", SamplingParams(temperature=-0.1), "temperature"),
        ("hi", SamplingParams(top_p=0.0), "top_p"),
        ("hi", SamplingParams(top_p=1.5), "top_p"),
        ("hi", SamplingParams(top_k=0), "top_k"),
        ("hi", SamplingParams(top_k=-2), "top_k"),
        ("hi", SamplingParams(min_p=-0.5), "min_p"),
        ("hi", SamplingParams(min_p=1.5), "min_p"),
        ([1, 2, 10**6], SamplingParams(), "vocabulary"),
        ([1, -1], SamplingParams(), "vocabulary"),
        ([5] * 255, SamplingParams(max_tokens=2), "max_tokens"),
        ("hi", SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
        ("hi", SamplingParams(logprobs=21), "logprobs"),
        ("hi", SamplingParams(seed=-1), "seed"),
        ("hi", SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
        ("hi", SamplingParams(stop=[""]), "stop"),
        ("hi", SamplingParams(stop=["x"], detokenize=False), "stop"),
    ],
)
def test_bad_input_raises_value_error_naming_the_field(llm, prompt, params, field) -> None:
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt], params, use_tqdm=False)
    # Nothing is left behind, and the next valid request is served.
    assert not llm.engine.has_unfinished
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 3


def test_bad_input_names_the_prompt_and_sampling_params_by_index(llm) -> None:
    with pytest.raises(ValueError, match=r"^sampling_params\[1\]\.top_p=2\.0 is invalid: must"):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams(top_p=2.0)], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^sampling_params\.top_k=0 is invalid"):
        llm.generate(["a", "b"], SamplingParams(top_k=0), use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompts\[1\]\[2\]=-3 is invalid: must be in \[0, "):
        llm.generate([[1], [1, 2, -3]], use_tqdm=False)
    assert not llm.engine.has_unfinished  # none of the batch was admitted


def test_result_is_a_dict_with_text_and_token_ids(llm) -> None:
    out = llm.generate("The cat", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert set(out[0]) == {"text", "token_ids"} and len(out[0]["token_ids"]) == 5
    assert out[0]["text"] == llm.tokenizer.decode(out[0]["token_ids"])


def test_seeded_request_is_the_same_alone_and_in_a_full_batch(llm) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12)
    alone = llm.generate(["Once upon a time"], seeded, use_tqdm=False)[0]["token_ids"]
    crowd_prompts = ["Once upon a time"] + [f"noise {i}" for i in range(15)]
    crowd_params = [seeded] + [SamplingParams(temperature=1.0, max_tokens=12)] * 15
    together = llm.generate(crowd_prompts, crowd_params, use_tqdm=False)[0]["token_ids"]
    assert together == alone


def test_top_k_one_equals_greedy(llm) -> None:
    greedy = llm.generate(["A B C"], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    top1 = llm.generate(
        ["A B C"], SamplingParams(temperature=0.9, top_k=1, max_tokens=10), use_tqdm=False
    )
    assert greedy[0]["token_ids"] == top1[0]["token_ids"]


def test_stop_token_ids_end_the_request(llm) -> None:
    first = llm.generate(["x y"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    stop_id = first["token_ids"][2]
    out = llm.generate(
        ["x y"],
        SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )
    ids = out[0]["token_ids"]
    assert ids[-1] == stop_id and len(ids) == first["token_ids"].index(stop_id) + 1


def test_stop_string_cuts_the_text(llm) -> None:
    first = llm.generate(["q"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0][
        "text"
    ]
    stop = first[3:5]
    out = llm.generate(
        ["q"], SamplingParams(temperature=0, max_tokens=12, stop=[stop]), use_tqdm=False
    )
    assert out[0]["text"] == first[: first.index(stop)]


def test_include_stop_str_in_output_keeps_the_stop_string(llm) -> None:
    first = llm.generate(["q"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0][
        "text"
    ]
    stop = first[3:5]
    params = SamplingParams(temperature=0, max_tokens=12, stop=[stop, first[4:6]])
    params.include_stop_str_in_output = True
    out = llm.generate(["q"], params, use_tqdm=False)
    assert out[0]["text"] == first[: first.index(stop) + len(stop)]  # the earliest match


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens_decides_whether_they_add_text(llm, skip: bool) -> None:
    special = min(llm.tokenizer.special_token_ids)
    params = SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, logit_bias={special: 100.0}
    )
    params.skip_special_tokens = skip
    out = llm.generate(["q"], params, use_tqdm=False)[0]
    assert out["token_ids"] == [special] * 3
    expected = "" if skip else llm.tokenizer.decode([special] * 3, skip_special_tokens=False)
    assert expected or skip
    assert out["text"] == expected


def test_min_tokens_holds_back_eos(llm) -> None:
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=20, min_tokens=20)
    out = llm.generate(["hi"] * 4, params, use_tqdm=False)
    eos = set(llm.engine.info.eos_token_ids)
    assert all(len(o["token_ids"]) == 20 and not eos & set(o["token_ids"]) for o in out)


def test_every_block_is_free_after_generate(llm) -> None:
    llm.generate(["a", "b c d", "e" * 40], SamplingParams(max_tokens=20), use_tqdm=False)
    manager = llm.engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    manager.check_invariants([])


def test_async_and_sync_scheduling_sample_the_same_tokens(tiny_model_dir) -> None:
    prompts = ["one", "two three", "four five six"] * 3
    params = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=9 + i, stop_token_ids=[7])
        for i in range(9)
    ]
    results = []
    for async_scheduling, depth in ((True, 1), (True, 2), (False, 1)):
        llm = LLM(
            str(tiny_model_dir),
            device="cpu",
            block_size=16,
            num_kv_blocks=64,
            async_scheduling=async_scheduling,
            pipeline_depth=depth,
        )
        results.append(llm.generate(prompts, params, use_tqdm=False))
    assert results[0] == results[1] == results[2]
    # At least one request stopped early (EOS): tokens computed past a stop are never shown.
    assert any(len(r["token_ids"]) < p.max_tokens for r, p in zip(results[0], params))


@pytest.mark.parametrize(
    "options", [{"pipeline_depth": 0}, {"pipeline_depth": 2, "async_scheduling": False}]
)
def test_bad_pipeline_depth_raises_value_error_naming_it(tiny_model_dir, options) -> None:
    with pytest.raises(ValueError, match="pipeline_depth"):
        LLM(str(tiny_model_dir), device="cpu", block_size=16, num_kv_blocks=64, **options)
