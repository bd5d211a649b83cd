"""kernels.skinny_norm_gemm computes the residual add, the RMSNorm and F.linear after it.

On CPU in the Triton interpreter at small shapes (ragged N and K, strided NaN-padded rows, split-K
called twice, the first layer's case without a residual); ``@pytest.mark.gpu``: Qwen3-0.6B's QKV
and gate_up shapes in bf16 inside a CUDA graph, and the decoder layer dispatching to it at decode
batch sizes only.
"""

from __future__ import annotations

import pytest
import torch

from kernels import skinny_norm_gemm as sng
from kernels.skinny_gemm import SkinnyGemmConfig
from models.layers.layernorm import RMSNorm, norm_then_linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAN = float("nan")
EPS = 1e-6


def _rows(rows: int, k: int, seed: int) -> torch.Tensor:
    """[rows, k] random values as a strided view, NaN beyond each row."""
    torch.manual_seed(seed)
    buffer = torch.full((rows, k + 3), NAN, device=DEVICE)
    buffer[:, :k] = torch.randn(rows, k, device=DEVICE)
    return buffer[:, :k]


@pytest.mark.parametrize(
    "rows, n, k, config, with_residual",
    [
        (1, 64, 256, SkinnyGemmConfig(32, 64, 1, 4, 2), True),
        (5, 80, 300, SkinnyGemmConfig(32, 64, 3, 4, 2), True),  # ragged, three slices
        (16, 48, 128, SkinnyGemmConfig(16, 64, 1, 4, 2), True),
        (3, 40, 192, SkinnyGemmConfig(16, 64, 2, 4, 2), False),  # the first layer
    ],
)
def test_norm_gemm_matches_the_norm_then_f_linear(rows, n, k, config, with_residual) -> None:
    x, residual = _rows(rows, k, 0), _rows(rows, k, 1) if with_residual else None
    g = torch.rand(k, device=DEVICE) + 0.5
    w = torch.randn(n, k, device=DEVICE)
    want, want_sum = sng.skinny_norm_gemm_ref(x, residual, g, EPS, w)
    for _ in range(2):  # the second call finds the split-K counters reset
        got, got_sum = sng.skinny_norm_gemm(x, residual, g, EPS, w, config)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got_sum, want_sum)
        assert (got_sum is x) == (residual is None)


def test_norm_gemm_refuses_mismatched_inputs() -> None:
    x, w = torch.randn(2, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="residual must be like x"):
        sng.skinny_norm_gemm(x, torch.randn(3, 32, device=DEVICE), torch.ones(32), EPS, w)
    with pytest.raises(ValueError, match="norm_weight must be"):
        sng.skinny_norm_gemm(x, None, torch.ones(32, dtype=torch.float64), EPS, w)


@pytest.mark.gpu
@pytest.mark.parametrize("name, n", [("qkv", 4096), ("gate_up", 6144)])
@pytest.mark.parametrize("rows", [1, 7, 16])
def test_gpu_decode_shapes_in_a_graph_match_the_reference(name, n, rows) -> None:
    k = 1024
    x = (torch.randn(rows, k, device="cuda") * 3).to(torch.bfloat16)
    residual = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    g = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    want, want_sum = sng.skinny_norm_gemm_ref(
        x.double(), residual.double(), g.double(), EPS, w.double()
    )
    sng.skinny_norm_gemm(x, residual, g, EPS, w)  # compiles and sizes the workspace
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, summed = sng.skinny_norm_gemm(x, residual, g, EPS, w)
    for _ in range(2):
        graph.replay()
        torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(summed.double(), want_sum, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_the_layer_fuses_at_decode_rows_only(monkeypatch) -> None:
    calls = []
    real = sng.skinny_norm_gemm
    monkeypatch.setattr(sng, "skinny_norm_gemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    norm = RMSNorm(1024, EPS).cuda().to(torch.bfloat16)
    layer = torch.nn.Linear(1024, 4096, bias=False).cuda().to(torch.bfloat16)
    for rows, fused in ((16, True), (17, False)):
        calls.clear()
        x = torch.randn(rows, 1024, device="cuda").to(torch.bfloat16)
        residual = torch.randn(rows, 1024, device="cuda").to(torch.bfloat16)
        out, summed = norm_then_linear(norm, x, residual, layer)
        hidden, want_sum = norm(x, residual)
        torch.testing.assert_close(out, layer(hidden), rtol=2e-2, atol=2e-2)
        assert torch.equal(summed, want_sum) and bool(calls) == fused
