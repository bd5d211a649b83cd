"""Attention backends: the Triton backend agrees with the torch reference on whole steps (store,
then attend), and the backend choice names what is allowed."""

from __future__ import annotations

import math

import pytest
import torch

from models.layers.attention import KVStore
from tests.kernel_helpers import (
    DEVICE,
    NAN,
    assert_close_rel,
    make_paged_kv,
    make_step_metadata,
)
from worker_service import attention_backends, flash_attn_backend
from worker_service.flash_attn_backend import flash_attn_available

# ---------------------------------------------------------------- backend


@pytest.mark.parametrize(
    "cached_and_new",
    [[(0, 9), (0, 3)], [(20, 7), (0, 18)], [(30, 1), (4, 1), (0, 1)]],
    ids=["plain-prefill", "chunked-prefill", "decode"],
)
def test_triton_backend_matches_torch_backend(cached_and_new: list[tuple[int, int]]) -> None:
    block_size, num_kv_heads, group, head_dim = 16, 2, 2, 16
    seq_lens = [cached + new for cached, new in cached_and_new]
    k_cache, v_cache, block_tables = make_paged_kv(
        [c for c, _ in cached_and_new], block_size, num_kv_heads, head_dim, torch.float32
    )
    # Give every sequence room for its new tokens: extra blocks from a larger pool.
    num_blocks = sum(math.ceil(n / block_size) for n in seq_lens) + 2
    pool_shape = (num_blocks + k_cache.shape[0], *k_cache.shape[1:])
    k_pool = torch.full(pool_shape, NAN, device=DEVICE)
    v_pool = torch.full(pool_shape, NAN, device=DEVICE)
    k_pool[: k_cache.shape[0]], v_pool[: v_cache.shape[0]] = k_cache, v_cache
    tables = torch.full((len(seq_lens), num_blocks), -1, dtype=torch.int32, device=DEVICE)
    next_free = k_cache.shape[0]
    for b, seq_len in enumerate(seq_lens):
        cached_blocks = block_tables[b][block_tables[b] >= 0]
        tables[b, : len(cached_blocks)] = cached_blocks
        for i in range(len(cached_blocks), math.ceil(seq_len / block_size)):
            tables[b, i], next_free = next_free, next_free + 1
    meta = make_step_metadata(cached_and_new, tables, block_size)
    num_tokens = sum(n for _, n in cached_and_new)
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, device=DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    triton, torch_ref = attention_backends.TritonBackend(), attention_backends.TorchRefBackend()
    triton.store_kv(k, v, KVStore(k_pool, v_pool, meta.slot_mapping))
    out = triton.forward(q, k, v, k_pool, v_pool, meta, 0.25)
    torch_ref.store_kv(k, v, KVStore(k_ref, v_ref, meta.slot_mapping))
    ref = torch_ref.forward(q, k, v, k_ref, v_ref, meta, 0.25)
    assert_close_rel(out, ref, torch.float32)
    torch.testing.assert_close(k_pool, k_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_pool, v_ref, equal_nan=True, rtol=0, atol=0)


def test_triton_backend_without_cache_attends_densely() -> None:
    meta = make_step_metadata([(0, 5), (0, 3)], torch.zeros(2, 1, dtype=torch.int32), 16)
    q, k, v = (torch.randn(8, 2, 16, device=DEVICE) for _ in range(3))
    empty = torch.empty(0, device=DEVICE)
    out = attention_backends.TritonBackend().forward(q, k, v, empty, empty, meta, 0.25)
    ref = attention_backends.dense_causal_varlen_ref(q, k, v, meta.cu_seqlens_q, 0.25)
    assert_close_rel(out, ref, torch.float32)


def test_select_backend_names_the_allowed_backends_for_unknown_ones() -> None:
    for spec in ("xformers", "prefill=triton", "prefill=torch,decode=triton", "decode=x,prefill=y"):
        with pytest.raises(
            ValueError, match="allowed: auto, torch, triton, flash-attn, or prefill"
        ):
            attention_backends.select_backend(torch.device("cpu"), spec)


CUDA = torch.device("cuda")  # never touched: every path below decides before using the device


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn 4 is installed here")
def test_forcing_flash_attn_without_the_package_names_the_package() -> None:
    for spec in ("flash-attn", "prefill=flash-attn,decode=triton"):
        with pytest.raises(ValueError, match="needs the flash-attn-4 package"):
            attention_backends.select_backend(CUDA, spec)


def test_auto_on_cuda_without_flash_attn_is_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash_attn_backend, "flash_attn_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (10, 0))
    table = {10: {"prefill": "flash-attn", "decode": "triton"}}  # even where it would be chosen
    monkeypatch.setattr(attention_backends, "AUTO_WITH_FLASH_ATTN", table)
    assert attention_backends.auto_backends(CUDA) == "triton"
    assert attention_backends.auto_backends(torch.device("cpu")) == "torch"


def test_auto_does_not_import_flash_attn_where_the_table_says_triton(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flash_attn_backend, "flash_attn_available", lambda: pytest.fail("imported"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert attention_backends.auto_backends(CUDA) == "triton"


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((9, 0), "triton"),
        ((8, 0), "triton"),
        ((10, 0), {"prefill": "flash-attn", "decode": "triton"}),
    ],
    ids=["hopper-as-measured", "unlisted-arch", "an-arch-listed-per-phase"],
)
def test_auto_with_flash_attn_picks_the_measured_backend_per_phase(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: object
) -> None:
    monkeypatch.setattr(flash_attn_backend, "flash_attn_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    table = attention_backends.AUTO_WITH_FLASH_ATTN | {
        10: {"prefill": "flash-attn", "decode": "triton"}
    }
    monkeypatch.setattr(attention_backends, "AUTO_WITH_FLASH_ATTN", table)
    assert attention_backends.auto_backends(CUDA) == expected


class Recorder:
    """A stand-in backend that says which phase it was asked for."""

    fuses_kv_store = True
    captures_prefill = True

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, []

    def store_kv(self, k, v, kv_store) -> None:
        self.calls.append("store")

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        self.calls.append("decode" if meta.is_decode else "prefill")
        return q


def test_phased_backend_sends_decode_steps_to_one_backend_and_the_rest_to_the_other() -> None:
    prefill, decode = Recorder("flash-attn"), Recorder("triton")
    phased = attention_backends.PhasedBackend(prefill, decode)
    assert phased.name == "prefill=flash-attn,decode=triton"
    tables = torch.zeros(2, 1, dtype=torch.int32)
    cache, empty = torch.zeros(4, 16, 1, 8), torch.empty(0)
    q = torch.zeros(2, 1, 8)
    for cached_and_new in ([(3, 1), (0, 1)], [(0, 1), (4, 2)]):
        meta = make_step_metadata(cached_and_new, tables, 16)
        phased.forward(q, q, q, cache, cache, meta, 1.0)
    decode_meta = make_step_metadata([(0, 1)], tables[:1], 16)
    phased.forward(q, q, q, empty, empty, decode_meta, 1.0)  # profiling: no cache, the prefill one
    phased.store_kv(q, q, KVStore(cache, cache, decode_meta.slot_mapping))
    assert decode.calls == ["decode"]
    assert prefill.calls == ["prefill", "decode", "store"]


def test_select_backend_on_cpu_is_torch_unless_triton_is_forced_under_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    assert attention_backends.select_backend(cpu).name == "torch"
    assert attention_backends.select_backend(cpu, "auto").name == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention_backends.select_backend(cpu, "triton").name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        attention_backends.select_backend(cpu, "triton")


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn 4 is installed here")
def test_the_worker_refuses_flash_attn_at_start_naming_the_package() -> None:
    from worker_service.__main__ import main

    with pytest.raises(SystemExit, match="--attention-backend: .*needs the flash-attn-4 package"):
        main(["--model", "not-loaded", "--device", "cpu", "--attention-backend", "flash-attn"])
    with pytest.raises(SystemExit, match="--attention-backend: unknown attention backend 'x'"):
        main(["--model", "not-loaded", "--device", "cpu", "--attention-backend", "x"])
