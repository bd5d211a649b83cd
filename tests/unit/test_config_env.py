"""Every flag of both services also reads from a NANOSERVE_* environment variable."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from protos.envargs import apply_env_defaults
from scheduler_service.config import SchedulerServiceConfig
from worker_service.__main__ import config_from_args, parse_args, use_compile_cache


def test_worker_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOSERVE_MODEL", "/models/x")
    monkeypatch.setenv("NANOSERVE_MAX_NUM_SEQS", "12")
    monkeypatch.setenv("NANOSERVE_ENFORCE_EAGER", "yes")
    config = config_from_args(parse_args([]))
    assert (config.model_dir, config.max_num_seqs, config.enforce_eager) == ("/models/x", 12, True)


def test_a_command_line_flag_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOSERVE_MAX_NUM_SEQS", "12")
    assert parse_args(["--model", "m", "--max-num-seqs", "3"]).max_num_seqs == 3


def test_scheduler_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOSERVE_MODEL", "/models/x")
    monkeypatch.setenv("NANOSERVE_WORKERS", "a:1,b:2")
    monkeypatch.setenv("NANOSERVE_MAX_NUM_WAITING", "9")
    config = SchedulerServiceConfig.from_args([])
    assert config.max_num_waiting == 9 and len(config.worker_addrs) == 2


def test_a_bad_value_names_the_variable() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-num-seqs", type=int, default=1)
    with pytest.raises(SystemExit, match="NANOSERVE_MAX_NUM_SEQS"):
        apply_env_defaults(parser, {"NANOSERVE_MAX_NUM_SEQS": "many"})


def test_scheduler_pipeline_depth_defaults_to_two_and_refuses_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = ["--model", "m", "--workers", "a:1"]
    assert SchedulerServiceConfig.from_args(base).engine_config.pipeline_depth == 2
    monkeypatch.setenv("NANOSERVE_PIPELINE_DEPTH", "3")
    assert SchedulerServiceConfig.from_args(base).engine_config.pipeline_depth == 3
    with pytest.raises(ValueError, match="pipeline_depth"):
        SchedulerServiceConfig.from_args([*base, "--pipeline-depth", "0"])


def test_the_compile_cache_dir_becomes_tritons_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NANOSERVE_COMPILE_CACHE_DIR", str(tmp_path / "triton"))
    args = parse_args(["--model", "m"])
    environ: dict[str, str] = {}
    use_compile_cache(args.compile_cache_dir, environ)
    assert environ == {
        "TRITON_CACHE_DIR": str(tmp_path / "triton"),
        "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "1",
        "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(tmp_path / "triton" / "flash_attn"),
    }
    assert (tmp_path / "triton").is_dir()
    untouched: dict[str, str] = {}
    use_compile_cache(
        parse_args(["--model", "m", "--compile-cache-dir", ""]).compile_cache_dir, untouched
    )
    assert untouched == {}
