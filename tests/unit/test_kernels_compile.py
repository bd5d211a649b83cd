"""Every Triton kernel compiles for an H100/H200 (sm_90), checked on a CPU, ahead of time.

CI has no GPU: the other kernel tests run in the Triton interpreter, which executes a kernel's
Python and never its compiler, so a kernel the GPU compiler refuses (a construct or a type the
interpreter lets through) would first fail on a GPU. Here, in a process without the interpreter,
Triton's own compiler and ptxas build each kernel for ``GPUTarget("cuda", 90, 32)`` with the
launch parameters a Qwen3-0.6B step gives it on the GPU (bf16, PDL on, the GPU's configs), and
the programmatic-dependent-launch kernels must carry ``griddepcontrol``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[2]
H, HQ, HKV, D, BLOCK, VOCAB = 1024, 16, 8, 128, 256, 151936  # Qwen3-0.6B, the worker's blocks


def kernel_cases() -> list[tuple[str, str, dict, dict, dict]]:
    """(module, kernel, pointer dtypes other than bf16, constexprs, options) per launch kind."""
    import triton

    from kernels import paged_decode_attention as dec
    from kernels import paged_prefill_attention as pre
    from kernels import sample_tokens, skinny_gemm_configs
    from kernels.embed_tokens import BLOCK_HIDDEN

    decode = dec.default_decode_config(D)
    prefill = pre.default_prefill_config(2, D, torch.device("cuda"))  # reads the type: no GPU
    ints = dict.fromkeys(("seq_lens_ptr", "block_tables_ptr", "cu_seqlens_q_ptr"), "*i32")
    fp32 = dict.fromkeys(("part_out_ptr", "part_lse_ptr", "partial_ptr", "part_score_ptr"), "*fp32")
    pdl = {"USE_PDL": True}
    cases = []
    for splits in (1, 4):
        cases.append(("paged_decode_attention", "_paged_decode_kernel", {**ints, **fp32}, {
            "GROUP": 2, "GROUP_PAD": 16, "HEAD_DIM": D, "BLOCK_SIZE": BLOCK,
            "BLOCK_N": decode.block_n, "NUM_SPLITS": splits, "TILE_IN_ONE_BLOCK": True,
            "NUM_KV_HEADS": HKV, **pdl,
        }, {"num_warps": decode.num_warps, "num_stages": decode.num_stages}))  # fmt: skip
    cases.append(("paged_decode_attention", "_combine_splits_kernel", {**ints, **fp32}, {
        "NUM_SPLITS": 4, "SPLITS_PAD": 4, "HEAD_DIM": D, "BLOCK_N": decode.block_n, **pdl,
    }, {"num_warps": 4}))  # fmt: skip
    cases.append(("paged_prefill_attention", "_paged_prefill_kernel", ints, {
        "GROUP": 2, "HEAD_DIM": D, "BLOCK_SIZE": BLOCK, "BLOCK_M": prefill.block_m,
        "BLOCK_Q": prefill.block_m // 2, "BLOCK_N": prefill.block_n, "TILE_IN_ONE_BLOCK": True,
    }, {"num_warps": prefill.num_warps, "num_stages": prefill.num_stages}))  # fmt: skip
    for store in (False, True):
        cases.append(("qk_norm_rope", "_qk_norm_rope_kernel", {
            "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
            "slot_mapping_ptr": "*i64",
        }, {
            "STORE_KV": store, "NUM_Q_HEADS": HQ, "NUM_KV_HEADS": HKV, "HALF": D // 2,
            "BLOCK_Q_HEADS": HQ, "BLOCK_KV_HEADS": HKV, "BLOCK_HALF": D // 2, **pdl,
        }, {"num_warps": 4, "enable_fp_fusion": False}))  # fmt: skip
    for residual in (False, True):
        cases.append(("rms_norm", "_rms_norm_kernel", {}, {
            "HIDDEN": H, "BLOCK_H": H, "HAS_RESIDUAL": residual, **pdl,
        }, {"num_warps": 4, "enable_fp_fusion": False}))  # fmt: skip
    chunks = triton.cdiv(VOCAB, sample_tokens.CHUNK_SIZE)
    cases.append(("sample_tokens", "_sample_chunk_kernel", {
        "temperatures_ptr": "*fp32", "seeds_ptr": "*i64", "part_index_ptr": "*i32", **fp32,
    }, {
        "CHUNK": sample_tokens.CHUNK_SIZE, "BLOCK": min(1024, sample_tokens.CHUNK_SIZE),
        "FAST_LOG": True, **pdl,
    }, {}))  # fmt: skip
    cases.append(("sample_tokens", "_pick_kernel", {
        "part_index_ptr": "*i32", "out_ptr": "*i64", **fp32,
    }, {"BLOCK_C": 1 << (chunks - 1).bit_length(), **pdl}, {}))  # fmt: skip
    cases.append(("silu_and_mul", "_silu_and_mul_kernel", {}, {
        "INTERMEDIATE": 3072, "BLOCK": 1024, **pdl,
    }, {"num_warps": 4, "enable_fp_fusion": False}))  # fmt: skip
    for (n, k), gated in (((4096, 1024), False), ((1024, 3072), False), ((6144, 1024), True)):
        config = (
            skinny_gemm_configs.gated_config_for if gated else skinny_gemm_configs.config_for
        )(n, k)
        k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
        cases.append(("skinny_gemm", "_skinny_gemm_kernel", {
            "counter_ptr": "*i32", **fp32,
        }, {
            "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
            "SPLIT_K": triton.cdiv(k, k_per_split), "K_PER_SPLIT": k_per_split, "GATED": gated,
            "PRECISION": "tf32", **pdl,
        }, {"num_warps": config.warps, "num_stages": config.stages}))  # fmt: skip
    cases.append(("store_kvcache", "_store_kvcache_kernel", {"slot_mapping_ptr": "*i64"}, {
        "NUM_KV_HEADS": HKV, "HEAD_DIM": D, "BLOCK_HD": HKV * D,
    }, {"num_warps": 4}))  # fmt: skip
    cases.append(("embed_tokens", "_embed_kernel", dict.fromkeys(
        ("ids_ptr", "prev_rows_ptr", "prev_tokens_ptr"), "*i64"
    ), {"HAS_PENDING": True, "BLOCK_H": min(BLOCK_HIDDEN, H), **pdl}, {}))  # fmt: skip
    return cases


FLOAT_SCALARS = {"eps", "scale_log2"}


def compile_case(module: str, kernel: str, pointers: dict, constexprs: dict, options: dict):
    """Compile one kernel for sm_90; returns its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"kernels.{module}"), kernel)
    signature, values = {}, {}
    for i, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            values[(i,)] = constexprs[param.name]
        elif param.name.endswith("_ptr"):
            signature[param.name] = pointers.get(param.name, "*bf16")
        else:
            signature[param.name] = "fp32" if param.name in FLOAT_SCALARS else "i32"
    source = ASTSource(fn, signature, constexprs=values)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.asm["ptx"]


def main() -> None:
    """In a process without the interpreter: compile every case, print one JSON line each."""
    for case in kernel_cases():
        module, kernel, _, constexprs, _ = case
        try:
            ptx = compile_case(*case)
            result = {"pdl": "griddepcontrol" in ptx} if constexprs.get("USE_PDL") else {}
        except Exception as error:  # reported by the test, whatever it is
            result = {"error": f"{type(error).__name__}: {str(error)[-2000:]}"}
        print(json.dumps({"kernel": f"{module}.{kernel}", **result}), flush=True)


def test_every_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(ROOT / ".pytest_cache" / "triton_aot")
    code = "from tests.unit.test_kernels_compile import main; main()"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(results) == len(kernel_cases())
    failures = [r for r in results if "error" in r or r.get("pdl") is False]
    assert not failures, json.dumps(failures, indent=1)[:6000]
