"""Tensor parallelism on CPU (gloo): a model sharded over worker processes computes what one does.

Checkpoints are written by transformers. Each rank is its own ``python -m worker_service`` process
with its own run directory and gRPC port; the ranks share nothing but the rendezvous address
(``--dist-init-addr``) and the scheduler, which is given every rank's address. Greedy output through
gRPC at TP=2 (and TP=4 for the 2-KV-head model) must equal TP=1's and transformers', with KV heads
split (2 heads over 2 ranks), replicated (1 head over 2 ranks; 2 heads over 4 ranks), tied and
untied embeddings, and a vocabulary that does not divide by the world size (padded LM-head shard).
A loading test proves each rank reads only its share of every sharded tensor from the file.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import Qwen3Config
from transformers import Qwen3ForCausalLM as HFQwen3ForCausalLM

import models.loader
from models.config import ModelConfig
from models.loader import load_weights
from models.parallel import ParallelContext
from models.qwen3 import Qwen3ForCausalLM
from nanoserve import launcher
from tests.conftest import copy_tokenizer
from tests.service_fixtures import BLOCK_SIZE, generate, generation_pb2_grpc, greedy, pb
from worker_service.attention_backends import TorchRefBackend

NUM_NEW_TOKENS = 16
NUM_KV_BLOCKS = 64
PROMPT_LENGTHS = (1, 9, 17, 40, 70)
CHECKPOINTS = {
    # (attention shape, vocab padding, tensor-parallel sizes to run besides 1)
    "kv2_tied": (dict(num_key_value_heads=2, tie_word_embeddings=True), 0, (2, 4)),
    "kv1_untied_odd_vocab": (dict(num_key_value_heads=1, tie_word_embeddings=False), 1, (2,)),
}


def write_checkpoint(out: Path, vocab_size: int, shape: dict, seed: int) -> Path:
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.2,  # large enough that greedy choices are not near-ties
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
        **shape,
    )
    torch.manual_seed(seed)
    HFQwen3ForCausalLM(config).to(torch.float32).save_pretrained(out)
    return out


def transformers_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = HFQwen3ForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW_TOKENS,
                min_new_tokens=NUM_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def tokenizer_vocab_size(tiny_model_dir: Path) -> int:
    return json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def case(request, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    shape, vocab_padding, tp_sizes = CHECKPOINTS[request.param]
    vocab_size = tokenizer_vocab_size(tiny_model_dir) + vocab_padding
    out = tmp_path_factory.mktemp(request.param)
    model_dir = write_checkpoint(out / "model", vocab_size, shape, seed=len(request.param))
    copy_tokenizer(tiny_model_dir, model_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab_size - 1) for _ in range(n)] for n in PROMPT_LENGTHS]
    return model_dir, out, prompts, tp_sizes, transformers_greedy(model_dir, prompts)


def start_ranks(model_dir: Path, run_dir: Path, world_size: int) -> list[launcher.ServiceProcess]:
    """One worker process per rank, each in its own directory; they meet at one store address."""
    dist_addr = f"127.0.0.1:{launcher.free_port()}" if world_size > 1 else None
    extra = ["--num-kv-blocks", str(NUM_KV_BLOCKS), "--block-size", str(BLOCK_SIZE)]
    ranks = []
    for rank in range(world_size):
        rank_dir = run_dir / f"rank{rank}"
        rank_dir.mkdir(parents=True)
        args = launcher.worker_args(str(model_dir), 0, "cpu", rank, world_size, dist_addr, extra)
        ranks.append(launcher.spawn(f"worker{rank}", "worker_service", args, rank_dir))
    return ranks


def generate_through_grpc(model_dir: Path, run_dir: Path, world_size: int, prompts) -> list:
    """Greedy output of every prompt, sent concurrently (so steps batch several sequences)."""
    services = start_ranks(model_dir, run_dir, world_size)
    try:
        for worker in services:
            worker.wait_for_port(120)
        addrs = [w.addr for w in reversed(services)]  # any order: the scheduler sorts by rank
        args = ["--model", str(model_dir), "--workers", ",".join(addrs), "--port", "0"]
        services.append(launcher.spawn("scheduler", "scheduler_service", args, run_dir))
        services[-1].wait_for_port(60)
        launcher.wait_until_serving(services[-1].addr, 60)
        with grpc.insecure_channel(services[-1].addr) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)

            def one(prompt: list[int]) -> list[int]:
                sampling = greedy(NUM_NEW_TOKENS, ignore_eos=True)
                replies = generate(stub, token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
                return list(replies[-1].complete.output_ids)

            with ThreadPoolExecutor(len(prompts)) as pool:
                return list(pool.map(one, prompts))
    except Exception:
        for service in services:
            print(f"--- {service.name} log ---\n{service._tail()}")
        raise
    finally:
        launcher.stop_all(services)


def test_sharded_greedy_output_equals_one_rank_and_transformers(case) -> None:
    model_dir, out, prompts, tp_sizes, expected = case
    assert generate_through_grpc(model_dir, out / "tp1", 1, prompts) == expected
    for world_size in tp_sizes:
        got = generate_through_grpc(model_dir, out / f"tp{world_size}", world_size, prompts)
        assert got == expected, f"TP={world_size}"


class CountingSlice:
    """A lazy safetensors slice that records the shape of every read."""

    def __init__(self, inner, name: str, reads: dict[str, list[tuple[int, ...]]]) -> None:
        self.inner, self.name, self.reads = inner, name, reads

    def get_shape(self) -> list[int]:
        return self.inner.get_shape()

    def __getitem__(self, index) -> torch.Tensor:
        tensor = self.inner[index]
        self.reads[self.name].append(tuple(tensor.shape))
        return tensor


class CountingFile:
    """``safe_open``'s handle with every ``get_slice`` counted and ``get_tensor`` forbidden."""

    def __init__(self, inner, reads: dict[str, list[tuple[int, ...]]]) -> None:
        self.inner, self.reads = inner, reads

    def __enter__(self) -> CountingFile:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self.inner.keys())

    def get_slice(self, name: str) -> CountingSlice:
        return CountingSlice(self.inner.get_slice(name), name, self.reads)

    def get_tensor(self, name: str) -> torch.Tensor:
        raise AssertionError(f"{name} read whole; ranks must read slices")


def rank_reads(model_dir: Path, rank: int, world_size: int, monkeypatch) -> dict[str, list]:
    """Load rank ``rank``'s shard (no process group needed) and return what it read, by tensor."""
    reads: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    real_safe_open = models.loader.safe_open
    monkeypatch.setattr(
        models.loader, "safe_open", lambda *a, **k: CountingFile(real_safe_open(*a, **k), reads)
    )
    config = ModelConfig.from_dir(model_dir)
    model = Qwen3ForCausalLM(config, TorchRefBackend(), ParallelContext(rank, world_size))
    load_weights(model, model_dir)
    return reads


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_each_rank_reads_only_its_share_of_each_tensor(
    num_kv_heads: int, tmp_path: Path, monkeypatch
) -> None:
    world_size, vocab_size = 2, 256
    shape = dict(num_key_value_heads=num_kv_heads, tie_word_embeddings=False)
    model_dir = write_checkpoint(tmp_path / "model", vocab_size, shape, seed=0)
    full = {name: tuple(t.shape) for name, t in load_safetensors(model_dir).items()}
    for rank in range(world_size):
        reads = rank_reads(model_dir, rank, world_size, monkeypatch)
        assert set(reads) == set(full)  # every tensor read, each exactly once
        for name, shapes in reads.items():
            assert len(shapes) == 1, name
            (rows, *cols), (read_rows, *read_cols) = full[name], shapes[0]
            if name.endswith("norm.weight"):
                expected = full[name]  # replicated
            elif name.endswith(("k_proj.weight", "v_proj.weight")) and num_kv_heads < world_size:
                expected = full[name]  # one KV head replicated on both ranks
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                expected = (rows, cols[0] // world_size)  # row-parallel: input columns split
            else:
                expected = (rows // world_size, *cols)  # column- and vocab-parallel: rows split
            assert (read_rows, *read_cols) == expected, name


def load_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))
