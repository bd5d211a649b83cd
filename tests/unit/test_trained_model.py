"""The committed trained tiny model: it has learned its corpus, and the engine runs it as transformers does.

Perplexity is measured on standard-library files the training never saw (models.tiny_data holds
them out) against an untrained model of the same config, same tokenizer. The tokenized corpus a
training run reads on another machine gives back what was written. Greedy continuations of
the engine and of transformers' own Qwen3 must agree token for token on the committed weights.
"""

from __future__ import annotations

import json
import lzma
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from bench.hf_reference import hf_greedy
from models import tiny, tiny_data, train_tiny
from nanoserve import LLM, SamplingParams

TRAINED_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tiny_trained"
PROMPTS = [
    "def fibonacci(n):",
    "import os\n",
    "class Stack:\n    def __init__(self):",
    "The server",
    "Once upon a time",
]
NUM_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def trained_model():
    model = AutoModelForCausalLM.from_pretrained(TRAINED_MODEL_DIR, dtype=torch.float32)
    return model.eval()


def held_out_python_ids(num_files: int) -> list[int]:
    tokenizer = Tokenizer.from_file(str(TRAINED_MODEL_DIR / "tokenizer.json"))
    held_out = tiny_data.python_corpus().held_out[:num_files]
    return tiny_data.encode_documents(tokenizer, held_out)


def test_held_out_perplexity_is_far_below_an_untrained_models(trained_model) -> None:
    config = json.loads((TRAINED_MODEL_DIR / "config.json").read_text())
    untrained = train_tiny.build_model(config).eval()
    ids = held_out_python_ids(num_files=8)
    trained_ppl = train_tiny.perplexity(trained_model, ids, num_windows=8, seq_len=256)
    untrained_ppl = train_tiny.perplexity(untrained, ids, num_windows=8, seq_len=256)
    assert untrained_ppl > config["vocab_size"] / 2  # untrained: about uniform over the vocab
    assert trained_ppl < untrained_ppl / 20, (trained_ppl, untrained_ppl)


def test_recorded_metrics_describe_the_committed_training_run() -> None:
    metrics = json.loads((TRAINED_MODEL_DIR / train_tiny.METRICS_NAME).read_text())
    assert metrics["seed"] == train_tiny.SEED
    assert metrics["command"].startswith("python -m models.train_tiny ")
    assert "--out" in shlex.split(metrics["command"])
    perplexity = metrics["held_out_perplexity"]
    assert perplexity["trained"]["python"] < perplexity["random"]["python"] / 50


def test_engine_greedy_output_equals_transformers_on_the_trained_model(trained_model) -> None:
    llm = LLM(str(TRAINED_MODEL_DIR), block_size=16, num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    expected = hf_greedy(trained_model, prompt_ids, NUM_NEW_TOKENS)
    assert [o["token_ids"] for o in outputs] == expected


def test_tokenized_corpus_file_gives_back_the_tokenizer_and_ids(tmp_path) -> None:
    tokenizer = tiny.train_tokenizer()
    english = tiny_data.english_corpus()
    stories = tmp_path / "stories.txt.xz"
    stories.write_bytes(lzma.compress(b"Once upon a time.\n"))
    written = tiny_data.TokenizedCorpus.encode(tokenizer, {"english": english}, stories)
    written.save(tmp_path / "tokens.npz")
    read = tiny_data.TokenizedCorpus.load(tmp_path / "tokens.npz")
    assert read.tokenizer.to_str() == tokenizer.to_str()
    assert read.sources == written.sources
    expected = tiny_data.encode_documents(tokenizer, english.held_out)
    assert read.held_out_ids["english"].dtype == np.uint16
    assert read.held_out_ids["english"].tolist() == expected
    assert len(read.train_ids["english"]) > len(expected)
