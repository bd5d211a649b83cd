"""The offline API: ``LLM(model_dir, **engine_options).generate(prompts, sampling_params)``.

Runs the scheduler and one worker in this process, through the same EngineCore and Worker code the
services use (the worker is called directly instead of over gRPC). With ``step_trace=PATH`` (or
``$NANOSERVE_STEP_TRACE``, read once here) both write the step trace: the worker's lines to PATH,
the engine's to PATH.scheduler, until ``close()`` (or the LLM is dropped, or the process exits).
"""

from __future__ import annotations

import os
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

from tqdm.auto import tqdm

from protos.sampling_params import SamplingParams
from protos.step_trace import SCHEDULER_SUFFIX, StepTrace
from scheduler_service.engine import EngineConfig, EngineCore
from scheduler_service.request_checks import RequestLimits, compile_error, validate_request
from scheduler_service.tokenizer import Tokenizer
from worker_service.config import WorkerConfig
from worker_service.worker import Worker

Prompt = str | list[int]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


STEP_TRACE_ENV = "NANOSERVE_STEP_TRACE"  # the services' --step-trace, as envargs names it


def _traces(path: str | None) -> tuple[StepTrace | None, StepTrace | None]:
    """The worker's and the engine's traces; (None, None) when ``path`` is empty (off)."""
    if not path:
        return None, None
    return StepTrace(path), StepTrace(path + SCHEDULER_SUFFIX)


def _close_all(traces: list[StepTrace]) -> None:
    for trace in traces:
        trace.close()


class LLM:
    """Generate text offline. Engine options are those of EngineConfig and WorkerConfig;
    ``step_trace``: PATH to trace every step to (default ``$NANOSERVE_STEP_TRACE``; "": off)."""

    def __init__(self, model: str, *, step_trace: str | None = None, **engine_options: Any) -> None:
        engine_keys = {f.name for f in fields(EngineConfig)}
        worker_keys = {f.name for f in fields(WorkerConfig)} - {"model_dir"}
        unknown = set(engine_options) - engine_keys - worker_keys
        if unknown:
            raise ValueError(f"unknown engine options: {sorted(unknown)}")
        engine_args = {k: v for k, v in engine_options.items() if k in engine_keys}
        worker_args = {k: v for k, v in engine_options.items() if k in worker_keys}
        worker_args.setdefault("device", _default_device())
        has_tokenizer = (Path(model) / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer.from_dir(model) if has_tokenizer else None
        trace_path = os.environ.get(STEP_TRACE_ENV) if step_trace is None else step_trace
        worker_trace, engine_trace = _traces(trace_path)
        self.worker = Worker(WorkerConfig(model_dir=model, **worker_args), worker_trace)
        engine_config = EngineConfig(**engine_args)
        self.engine = EngineCore(engine_config, self.worker, self.tokenizer, engine_trace)
        self.traces = [t.start() for t in (worker_trace, engine_trace) if t is not None]
        self._close_traces = weakref.finalize(self, _close_all, self.traces)

    def close(self) -> None:
        """Write out the step traces (if on) and remove their hooks: for when this LLM is done."""
        self._close_traces()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict[str, Any]]:
        """Return one ``{"text", "token_ids"}`` dict per prompt, in order."""
        one = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        prompts = cast(Sequence[Prompt], [prompts] if one else prompts)
        params = self._params_per_prompt(len(prompts), sampling_params)
        token_lists = [self._encode(p) for p in prompts]
        self._validate(token_lists, params, one_params=isinstance(sampling_params, SamplingParams))
        request_ids = [uuid.uuid4().hex for _ in prompts]
        for request_id, ids, p in zip(request_ids, token_lists, params):
            self.engine.add_request(request_id, ids, p)
        results = self._run(request_ids, use_tqdm)
        return [results[r] for r in request_ids]

    def _params_per_prompt(
        self, num_prompts: int, sampling_params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if len(sampling_params) != num_prompts:
            raise ValueError(
                f"sampling_params has {len(sampling_params)} entries for {num_prompts} prompts"
            )
        return list(sampling_params)

    def _validate(
        self, token_lists: list[list[int]], params: list[SamplingParams], one_params: bool
    ) -> None:
        """Every request checked (ValueError naming ``prompts[i]`` or ``sampling_params``)
        before any is admitted."""
        limits = RequestLimits(self.engine.info.vocab_size, self.engine.max_model_len)
        for i, (ids, p) in enumerate(zip(token_lists, params)):
            sampling_field = "sampling_params" if one_params else f"sampling_params[{i}]"
            validate_request(
                ids, p, limits, prompt_field=f"prompts[{i}]", sampling_field=sampling_field
            )
            if p.constraint and (error := self.worker.check_constraint(p.constraint)):
                raise compile_error(p.constraint, error, sampling_field)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "prompt is text but the model has no tokenizer.json: pass token ids"
                )
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            raise ValueError("prompt must be a string or a list of token ids")
        return prompt

    def _run(self, request_ids: list[str], use_tqdm: bool) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {r: {"text": "", "token_ids": []} for r in request_ids}
        bar = tqdm(
            total=len(request_ids), desc="Generating", dynamic_ncols=True, disable=not use_tqdm
        )
        try:
            while self.engine.has_unfinished:
                start = time.perf_counter()
                prefill_before = self.engine.num_prefill_tokens
                outputs = self.engine.step()
                elapsed = max(time.perf_counter() - start, 1e-9)
                num_prefill = self.engine.num_prefill_tokens - prefill_before
                num_decode = len(outputs)
                bar.set_postfix(
                    prefill=f"{int(num_prefill / elapsed)}tok/s",
                    decode=f"{int(num_decode / elapsed)}tok/s",
                )
                for out in outputs:
                    result = results[out.request_id]
                    result["token_ids"].extend(out.new_token_ids)
                    result["text"] += out.new_text
                    if out.finished:
                        bar.update(1)
        finally:
            bar.close()
        return results
