"""The fused elementwise Triton kernels compute what their torch references compute.

Covers ``rms_norm`` (with and without the residual add), ``qk_norm_rope`` (and
``qk_norm_rope_store_kv``, which also stores the new K/V) and ``silu_and_mul``.
Inputs are strided views into NaN-filled buffers (a read past a row fails) and outputs start as NaN
(an element never written fails); the in-place ``qk_norm_rope`` must also leave v and the padding
of the fused qkv buffer alone. On CPU the kernels run in the Triton interpreter at small shapes
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1``); ``@pytest.mark.gpu`` cases run at Qwen3
shapes in bf16 and check that the layers dispatch to the kernels without changing their results.
"""

from __future__ import annotations

import pytest
import torch

from kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref, qk_norm_rope_store_kv
from kernels.rms_norm import rms_norm, rms_norm_ref
from kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from kernels.store_kvcache import store_kvcache_ref
from models.config import ModelConfig
from models.layers.activation import SiluAndMul
from models.layers.attention import AttentionBackend, AttentionMetadata, KVStore
from models.layers.layernorm import RMSNorm
from models.layers.rotary import RotaryEmbedding
from models.loader import default_dtype
from models.parallel import SINGLE_RANK
from models.qwen3 import Qwen3Attention
from worker_service.attention_backends import TorchRefBackend, TritonBackend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAN = float("nan")
EPS = 1e-6
# The kernels round where the references round, so on the GPU the only differences are float32
# reduction order and rsqrt/exp: a few float32 ulps, or one bf16 ulp where that flips a rounding.
# The Triton interpreter truncates float32 -> bf16 instead of rounding, and qk_norm_rope rounds to
# bf16 five times in a row, so bf16 on CPU gets twice the room.
BF16_TOLERANCE = 2e-2 if DEVICE.type == "cuda" else 4e-2
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": BF16_TOLERANCE, "atol": BF16_TOLERANCE},
}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


def padded_rows(num_tokens: int, width: int, dtype: torch.dtype, pad: int) -> torch.Tensor:
    """``[T, width + pad]``: random values, then ``pad`` NaN columns."""
    buffer = torch.full((num_tokens, width + pad), NAN, dtype=dtype, device=DEVICE)
    buffer[:, :width] = torch.randn(num_tokens, width, device=DEVICE).to(dtype)
    return buffer


def strided_rows(num_tokens: int, width: int, dtype: torch.dtype, pad: int = 3) -> torch.Tensor:
    """Random ``[T, width]`` whose rows sit ``width + pad`` apart in a NaN-filled buffer."""
    return padded_rows(num_tokens, width, dtype, pad)[:, :width]


def random_weight(size: int, dtype: torch.dtype) -> torch.Tensor:
    return (1 + 0.2 * torch.randn(size, device=DEVICE)).to(dtype)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not finite"
    torch.testing.assert_close(out, ref, **TOLERANCE[out.dtype])


def assert_single_rounding_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """One float32 op rounded once is exact, except that the Triton interpreter (CPU) truncates
    float32 -> bf16 where the GPU rounds to nearest even."""
    if DEVICE.type == "cuda" or out.dtype == torch.float32:
        assert torch.equal(out, ref)
    else:
        assert_matches(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, hidden", [(1, 96), (5, 1536), (3, 128)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(
    num_tokens: int, hidden: int, dtype: torch.dtype, with_residual: bool
) -> None:
    x = strided_rows(num_tokens, hidden, dtype)
    weight = random_weight(hidden, dtype)
    out = torch.full((num_tokens, hidden), NAN, dtype=dtype, device=DEVICE)
    if not with_residual:
        assert_matches(rms_norm(x, weight, EPS, out=out), rms_norm_ref(x, weight, EPS))
        return
    residual = strided_rows(num_tokens, hidden, dtype, pad=5)
    residual_out = torch.full_like(out, NAN)
    got = rms_norm(x, weight, EPS, residual, out=out, residual_out=residual_out)
    ref = rms_norm_ref(x, weight, EPS, residual)
    assert got[0] is out and got[1] is residual_out
    assert_matches(out, ref[0])
    assert_single_rounding_matches(residual_out, ref[1])


def test_rms_norm_allocates_promoted_outputs_when_none_given() -> None:
    x = strided_rows(4, 96, torch.bfloat16)
    residual = strided_rows(4, 96, torch.bfloat16)
    weight = random_weight(96, torch.float32)  # bf16 x with a float32 weight: float32 output
    out, new_residual = rms_norm(x, weight, EPS, residual)
    ref_out, ref_residual = rms_norm_ref(x, weight, EPS, residual)
    assert out.dtype == torch.float32 and new_residual.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out, **TOLERANCE[torch.bfloat16])  # normed row is bf16
    assert_single_rounding_matches(new_residual, ref_residual)


def test_rms_norm_rejects_bad_inputs() -> None:
    x = torch.randn(4, 96, device=DEVICE)
    weight = torch.ones(96, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, weight[:64], EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, weight, EPS, x.to(torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(x.t().contiguous().t(), weight, EPS)
    with pytest.raises(ValueError, match="out"):
        rms_norm(x, weight, EPS, out=torch.empty(4, 95, device=DEVICE))


def fused_qkv(
    num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(buffer, q, k, v)``: head views into a padded, NaN-gapped fused qkv buffer."""
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    buffer = padded_rows(num_tokens, q_size + 2 * kv_size, dtype, pad=7)
    q, k, v = buffer[:, : q_size + 2 * kv_size].split([q_size, kv_size, kv_size], -1)
    return (
        buffer,
        q.view(num_tokens, num_q_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens, num_q_heads, num_kv_heads, head_dim",
    [(3, 4, 2, 64), (5, 6, 2, 128), (1, 2, 1, 64)],
)
def test_qk_norm_rope_matches_reference_in_place(
    num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    buffer, q, k, v = fused_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype)
    before = buffer.clone()
    rope = RotaryEmbedding(head_dim, max_position_embeddings=64, base=10000.0).to(DEVICE)
    positions = torch.randint(0, 64, (num_tokens,), device=DEVICE)
    q_weight, k_weight = random_weight(head_dim, dtype), random_weight(head_dim, dtype)
    caches = (rope.cos_cache, rope.sin_cache)
    ref_q, ref_k = qk_norm_rope_ref(positions, q, k, q_weight, k_weight, *caches, EPS)
    got_q, got_k = qk_norm_rope(positions, q, k, q_weight, k_weight, *caches, EPS)
    assert got_q is q and got_k is k
    assert_matches(q, ref_q)
    assert_matches(k, ref_k)
    width = (num_q_heads + num_kv_heads) * head_dim
    untouched = buffer[:, width:]  # v, then the NaN padding
    assert torch.equal(untouched.nan_to_num(), before[:, width:].nan_to_num())
    assert torch.isnan(buffer[:, -7:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(4, 2, 64), (2, 1, 32)])
def test_qk_norm_rope_store_kv_stores_the_new_kv_like_store_kvcache(
    num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    num_tokens, num_blocks, block_size = 5, 4, 4
    _, q, k, v = fused_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype)
    rope = RotaryEmbedding(head_dim, max_position_embeddings=64, base=10000.0).to(DEVICE)
    positions = torch.randint(0, 64, (num_tokens,), device=DEVICE)
    weights = random_weight(head_dim, dtype), random_weight(head_dim, dtype)
    caches = (rope.cos_cache, rope.sin_cache)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, 7.0, dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    slots = torch.tensor([3, -1, 12, 0, 15], device=DEVICE)  # -1: padding, never stored
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    q_ref, k_ref = q.clone(), k.clone()
    qk_norm_rope(positions, q_ref, k_ref, *weights, *caches, EPS)  # the unfused path
    store_kvcache_ref(k_ref, v, expected_k, expected_v, slots)
    got_q, got_k = qk_norm_rope_store_kv(
        positions, q, k, v, *weights, *caches, EPS, k_cache, v_cache, slots
    )
    assert got_q is q and got_k is k
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_qk_norm_rope_rejects_bad_inputs() -> None:
    _, q, k, _ = fused_qkv(2, 4, 2, 64, torch.float32)
    rope = RotaryEmbedding(64, max_position_embeddings=8, base=10000.0).to(DEVICE)
    caches = (rope.cos_cache, rope.sin_cache)
    weight = torch.ones(64, device=DEVICE)
    positions = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="q, k"):
        qk_norm_rope(positions, q, k[:1], weight, weight, *caches, EPS)
    with pytest.raises(ValueError, match="k_weight"):
        qk_norm_rope(positions, q, k, weight, weight[:32], *caches, EPS)
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rope(positions.float(), q, k, weight, weight, *caches, EPS)
    with pytest.raises(ValueError, match="caches"):
        qk_norm_rope(positions, q, k, weight, weight, caches[0][:, :32], caches[1], EPS)
    k_cache = torch.zeros(4, 4, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope_store_kv(
            positions, q, k, k, weight, weight, *caches, EPS, k_cache, k_cache, positions[:1]
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, intermediate", [(1, 96), (5, 1536), (3, 64)])
def test_silu_and_mul_matches_reference(
    num_tokens: int, intermediate: int, dtype: torch.dtype
) -> None:
    x = strided_rows(num_tokens, 2 * intermediate, dtype) * 3
    out = torch.full((num_tokens, intermediate), NAN, dtype=dtype, device=DEVICE)
    assert silu_and_mul(x, out) is out
    assert_matches(out, silu_and_mul_ref(x))


def test_silu_and_mul_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="2I"):
        silu_and_mul(torch.randn(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        silu_and_mul(torch.randn(2, 8, device=DEVICE), torch.empty(2, 3, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [256, 8192])
@pytest.mark.parametrize("hidden", [1024, 4096])
def test_rms_norm_layer_on_gpu_matches_torch_path(num_tokens: int, hidden: int) -> None:
    norm = RMSNorm(hidden, EPS).to(device="cuda", dtype=torch.bfloat16)
    norm.weight.copy_(random_weight(hidden, torch.bfloat16))
    x = strided_rows(num_tokens, hidden, torch.bfloat16)
    residual = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
    assert_matches(norm(x), rms_norm_ref(x, norm.weight, EPS))
    out, new_residual = norm(x, residual)
    ref_out, ref_residual = rms_norm_ref(x, norm.weight, EPS, residual)
    assert_matches(out, ref_out)
    assert torch.equal(new_residual, ref_residual)


def qwen3_attention(
    num_heads: int, num_kv_heads: int, head_dim: int, backend: AttentionBackend, dtype: torch.dtype
) -> Qwen3Attention:
    """One rank's attention layer built as ``load_model`` builds it (float32 cos/sin caches),
    with random q/k norm weights."""
    config = ModelConfig(
        vocab_size=64,
        hidden_size=num_heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=EPS,
        rope_theta=1e6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype=str(dtype).removeprefix("torch."),
        eos_token_ids=(0,),
        bos_token_id=None,
        attention_bias=False,
        model_type="qwen3",
    )
    with default_dtype(dtype), DEVICE:
        layer = Qwen3Attention(config, backend, SINGLE_RANK)
    layer.q_norm.weight.data.copy_(random_weight(head_dim, dtype))
    layer.k_norm.weight.data.copy_(random_weight(head_dim, dtype))
    return layer


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_qwen3_attention_norms_ropes_and_stores_the_new_kv(backend_name: str) -> None:
    """The layer's q/k norm + RoPE gives the torch path's q and k, and the cache then holds that
    k and v at the step's slots (on CUDA with the Triton backend: one fused kernel, in place)."""
    dtype = torch.bfloat16
    backend = TorchRefBackend() if backend_name == "torch" else TritonBackend()
    layer = qwen3_attention(4, 2, 64, backend, dtype)
    _, q, k, v = fused_qkv(5, 4, 2, 64, dtype)
    positions = torch.randint(0, 4096, (5,), device=DEVICE)
    ref_q, ref_k = layer.rotary_emb(positions, layer.q_norm(q), layer.k_norm(k))
    k_cache = torch.full((4, 4, 2, 64), 7.0, dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    slots = torch.tensor([3, -1, 12, 0, 15], device=DEVICE)  # -1: padding, never stored
    got_q, got_k = layer.qk_norm_rope_store_kv(positions, q, k, v, KVStore(k_cache, v_cache, slots))
    assert (got_q is q) == (DEVICE.type == "cuda")  # the fused kernel writes into qkv
    assert_matches(got_q, ref_q)
    assert_matches(got_k, ref_k)
    expected_k, expected_v = torch.full_like(k_cache, 7.0), torch.full_like(v_cache, 7.0)
    store_kvcache_ref(got_k, v, expected_k, expected_v, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_attention_layer_stores_nothing_until_a_cache_is_bound() -> None:
    layer = qwen3_attention(4, 2, 64, TorchRefBackend(), torch.float32)
    slots = torch.arange(3, device=DEVICE)
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    meta = AttentionMetadata(
        slot_mapping=slots,
        cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32, device=DEVICE),
        seq_lens=3 * one,
        block_tables=one[None, :] - 1,
        max_seqlen_q=3,
        max_seqlen_k=3,
        is_decode=False,
        is_plain_prefill=True,
    )
    assert layer.attn.kv_store(meta) is None  # the memory-profiling forward
    layer.attn.k_cache = k_cache = torch.zeros(1, 4, 2, 64, device=DEVICE)
    layer.attn.v_cache = v_cache = torch.zeros_like(k_cache)
    kv_store = layer.attn.kv_store(meta)
    assert kv_store is not None
    assert kv_store.k_cache is k_cache and kv_store.v_cache is v_cache
    assert kv_store.slot_mapping is slots


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [256, 8192])
def test_qk_norm_rope_layer_on_gpu_matches_torch_path(num_tokens: int) -> None:
    dtype = torch.bfloat16
    layer = qwen3_attention(16, 8, 128, TritonBackend(), dtype)  # Qwen3-0.6B
    _, q, k, v = fused_qkv(num_tokens, 16, 8, 128, dtype)
    positions = torch.randint(0, 4096, (num_tokens,), device="cuda")
    ref_q, ref_k = layer.rotary_emb(positions, layer.q_norm(q), layer.k_norm(k))
    got_q, got_k = layer.qk_norm_rope_store_kv(positions, q, k, v, None)
    assert got_q is q and got_k is k
    assert_matches(q, ref_q)
    assert_matches(k, ref_k)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [256, 8192])
def test_silu_and_mul_layer_on_gpu_matches_torch_path(num_tokens: int) -> None:
    x = strided_rows(num_tokens, 2 * 3072, torch.bfloat16) * 3
    assert_matches(SiluAndMul()(x), silu_and_mul_ref(x))
