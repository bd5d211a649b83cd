"""kernels.skinny_gemm computes F.linear.

On CPU the kernel runs in the Triton interpreter at small shapes, split-K included (its
last-arriving slice sums the partials and resets the counter, so a second call must agree too);
``@pytest.mark.gpu`` cases run Qwen3's decode shapes in bf16, inside a CUDA graph replayed twice,
and check that the layers dispatch to it at decode batch sizes and not beyond.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import skinny_gemm as sg
from kernels import skinny_gemm_configs as configs
from models.layers.activation import SiluAndMul, linear_silu_and_mul
from models.layers.linear import linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAN = float("nan")


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double(), w.double())


@pytest.mark.parametrize(
    "rows, n, k, config",
    [
        (1, 64, 256, sg.SkinnyGemmConfig(32, 64, 1, 4, 2)),
        (5, 80, 300, sg.SkinnyGemmConfig(32, 64, 3, 4, 2)),  # ragged N and K, three slices
        (16, 48, 512, sg.SkinnyGemmConfig(16, 128, 2, 4, 2)),
        (3, 40, 192, sg.SkinnyGemmConfig(16, 64, 8, 4, 2)),  # more slices asked than K has
        (40, 80, 300, sg.SkinnyGemmConfig(32, 64, 3, 4, 2)),  # three row blocks, ragged
        (40, 96, 128, sg.SkinnyGemmConfig(32, 64, 2, 4, 2, block_m=32)),  # two 32-row blocks
    ],
)
def test_skinny_gemm_matches_f_linear(rows, n, k, config) -> None:
    torch.manual_seed(rows)
    buffer = torch.full((rows, k + 5), NAN, device=DEVICE)  # strided rows, NaN beyond
    buffer[:, :k] = torch.randn(rows, k, device=DEVICE)
    x = buffer[:, :k]
    w = torch.randn(n, k, device=DEVICE)
    want = reference(x, w)
    for _ in range(2):  # the second call finds the counters reset by the first
        out = torch.full((rows, n), NAN, device=DEVICE)
        got = sg.skinny_gemm(x, w, config, out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def gated_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = reference(x, w).chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize(
    "rows, n, k, config",
    [
        (1, 128, 256, None),  # gated_config_for: half the plain block's columns
        (4, 80, 300, sg.SkinnyGemmConfig(16, 64, 3, 4, 2)),  # ragged, three slices
        (16, 96, 128, sg.SkinnyGemmConfig(32, 64, 1, 4, 2)),  # a block past the gate half's end
        (33, 96, 300, sg.SkinnyGemmConfig(16, 64, 2, 4, 2, block_m=32)),  # two row blocks
    ],
)
def test_gated_skinny_gemm_is_silu_and_mul_of_the_product(rows, n, k, config) -> None:
    torch.manual_seed(rows)
    x = torch.randn(rows, k, device=DEVICE)
    w = torch.randn(n, k, device=DEVICE)
    want = gated_reference(x, w)
    for _ in range(2):  # the second call finds the counters reset by the first
        out = torch.full((rows, n // 2), NAN, device=DEVICE)
        sg.skinny_gemm(x, w, config, out=out, gated=True)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="even N"):
        sg.skinny_gemm(x, w[:-1], gated=True)


def test_skinny_gemm_refuses_what_it_does_not_compute() -> None:
    w = torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[N, K\]"):
        sg.skinny_gemm(torch.randn(2, 31, device=DEVICE), w)
    with pytest.raises(ValueError, match="one dtype"):
        sg.skinny_gemm(torch.randn(2, 32, device=DEVICE, dtype=torch.bfloat16), w)


def test_config_splits_k_only_for_narrow_outputs() -> None:
    # Qwen3-0.6B o_proj and down_proj: 32 column blocks, one 256-wide K tile per program
    assert sg.config_for(1024, 2048).split_k == 8
    assert sg.config_for(1024, 3072).split_k == 12
    assert sg.config_for(4096, 1024).split_k == 1  # fused qkv: 128 column blocks
    assert sg.config_for(6144, 1024).block_n == 64  # fused gate_up


def test_more_than_16_rows_take_the_kernel_only_where_it_was_measured_faster() -> None:
    at = configs.config_at
    assert at(4096, 1024, 16, False) == sg.config_for(4096, 1024)  # any shape up to 16 rows
    assert at(6144, 1024, 16, True) == sg.gated_config_for(6144, 1024)
    assert at(4096, 1024, 17, False) is None  # the fused qkv: cuBLAS from 17 rows
    assert at(1024, 2048, 32, False).split_k == 8 and at(1024, 2048, 33, False) is None
    assert at(1024, 3072, 48, False).block_m == 64 and at(1024, 3072, 65, False) is None
    assert at(6144, 1024, 64, True) is not None and at(6144, 1024, 64, False) is None
    assert at(1000, 3072, 32, False) is None  # a shape not measured


def test_only_cuda_decode_rows_and_small_weights_take_the_kernel() -> None:
    w = torch.randn(64, 32)
    assert not sg.use_skinny(torch.randn(1, 32), w)  # CPU: F.linear
    if DEVICE.type == "cuda":
        w = w.to(DEVICE)
        assert sg.use_skinny(torch.randn(16, 32, device=DEVICE), w)
        assert not sg.use_skinny(torch.randn(17, 32, device=DEVICE), w)
        big = torch.empty(configs.MAX_WEIGHT_BYTES // 4 + 1, 1, device=DEVICE)
        assert not sg.use_skinny(torch.randn(1, 1, device=DEVICE), big)


QWEN3_SHAPES = {  # (N, K): Qwen3-0.6B's fused qkv, o_proj, gate_up, down_proj
    "qkv": (4096, 1024),
    "o_proj": (1024, 2048),
    "gate_up": (6144, 1024),
    "down": (1024, 3072),
}


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 7, 16, 32, 48, 64])
@pytest.mark.parametrize("name", sorted(QWEN3_SHAPES))
def test_gpu_decode_shapes_in_a_graph_match_f_linear(name, rows) -> None:
    n, k = QWEN3_SHAPES[name]  # past 16 rows with the launch shape of the 16-row case if need be
    torch.manual_seed(rows)
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    sg.skinny_gemm(x, w)  # compiles and sizes the workspace outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sg.skinny_gemm(x, w)
    want = reference(x, w)
    for _ in range(2):  # each replay must reset the split-K counters for the next
        out.fill_(NAN)
        graph.replay()
        torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)
    # cuBLAS on the same bf16 inputs: the same sums in another order
    cublas = F.linear(x, w)
    assert (out.float() - cublas.float()).abs().max() <= 2 * cublas.float().abs().max() / 128


@pytest.mark.gpu
def test_gpu_layers_take_the_kernel_at_decode_rows_only(monkeypatch) -> None:
    calls = []
    real = sg.skinny_gemm

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(sg, "skinny_gemm", counting)
    w = (torch.randn(1024, 2048, device="cuda") * 0.02).to(torch.bfloat16)
    for rows, expected in ((16, [w.shape]), (32, [w.shape]), (33, [])):  # o_proj: to 32 rows
        calls.clear()
        x = torch.randn(rows, 2048, device="cuda").to(torch.bfloat16)
        torch.testing.assert_close(linear(x, w, None), F.linear(x, w), rtol=1e-2, atol=1e-2)
        assert calls == expected


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 32, 64])
def test_gpu_gated_gate_up_in_a_graph_matches_gemm_then_silu_and_mul(rows) -> None:
    n, k = QWEN3_SHAPES["gate_up"]
    torch.manual_seed(rows)
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    sg.skinny_gemm(x, w, gated=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sg.skinny_gemm(x, w, gated=True)
    for _ in range(2):
        out.fill_(NAN)
        graph.replay()
        torch.testing.assert_close(out.double(), gated_reference(x, w), rtol=1e-2, atol=1e-2)
    same_shape = configs.config_at(n, k, rows, gated=True)  # the K order of the gated launch
    separate = SiluAndMul()(sg.skinny_gemm(x, w, same_shape))  # GEMM then activation: alike
    torch.testing.assert_close(out, separate, rtol=0, atol=0)
    calls = []
    monkeypatch = pytest.MonkeyPatch()
    real = sg.skinny_gemm
    monkeypatch.setattr(sg, "skinny_gemm", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    try:
        linear_silu_and_mul(x, w, None)
        linear_silu_and_mul(torch.randn(65, k, device="cuda").to(torch.bfloat16), w, None)
    finally:
        monkeypatch.undo()
    assert calls == [{"gated": True}]  # up to 64 rows: 65 take cuBLAS and the activation kernel


def test_kernels_launch_without_pdl_off_cuda_or_when_turned_off(monkeypatch) -> None:
    from kernels import pdl

    assert pdl.launch_options(torch.device("cpu")) == {"USE_PDL": False}
    monkeypatch.setattr(pdl, "enabled", False)
    assert pdl.launch_options(DEVICE) == {"USE_PDL": False}


def test_an_outgrown_workspace_is_kept_for_the_graphs_captured_with_it() -> None:
    workspace = sg.Workspace()
    small, counter = workspace.get(DEVICE, 8, 2)
    assert workspace.get(DEVICE, 4, 1)[0].data_ptr() == small.data_ptr()  # big enough: reused
    bigger, _ = workspace.get(DEVICE, 64, 2)
    assert bigger.numel() >= 64 and bigger.data_ptr() != small.data_ptr()
    assert any(t is small for t in workspace._outgrown)  # never freed under a graph
    assert counter.tolist() == [0, 0]
