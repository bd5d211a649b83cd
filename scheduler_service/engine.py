"""EngineCore: the scheduler side's step loop, shared by the offline LLM and the gRPC service.

It admits requests (checked at the API edge), asks the Scheduler for a batch, sends the delta
plan to the worker, and turns sampled tokens into per-request outputs (detokenized
incrementally, with stop checks). It knows the worker only through ``WorkerClient``: an
in-process ``Worker`` or a gRPC stub behind the same three calls.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Protocol

from protos.sampling_params import SamplingParams
from protos.step_plan import StepPlan, StepResult, WorkerInfo
from protos.step_trace import StepTrace
from scheduler_service.detokenizer import IncrementalDetokenizer
from scheduler_service.plan_builder import PlanBuilder
from scheduler_service.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from scheduler_service.sequence import Sequence
from scheduler_service.stop_checker import FinishReason, check_stop
from scheduler_service.tokenizer import Tokenizer


class WorkerClient(Protocol):
    """A worker (or a tensor-parallel group) seen from the engine. Plans are answered in order:
    ``receive`` returns the answer to the oldest ``submit``ted plan not yet answered."""

    def describe(self) -> WorkerInfo: ...

    def start_session(self) -> None: ...

    def submit(self, plan: StepPlan) -> None: ...

    def receive(self) -> StepResult: ...


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # default: the model's, capped by the cache
    enable_prefix_caching: bool = True
    detokenize: bool = True  # False: token ids only (benchmarks on token-id workloads)
    async_scheduling: bool = True  # plan step N+1 while the worker runs step N
    # Async scheduling: plans sent before waiting for an answer. 2 keeps the next step queued on
    # the device even when a round trip to a remote worker takes longer than a step.
    pipeline_depth: int = 1

    def __post_init__(self) -> None:
        if self.pipeline_depth < 1:
            raise ValueError(f"pipeline_depth={self.pipeline_depth} is invalid: must be >= 1")
        if self.pipeline_depth > 1 and not self.async_scheduling:
            raise ValueError(
                f"pipeline_depth={self.pipeline_depth} is invalid without async scheduling: "
                "must be 1"
            )


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and whether it ended."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    new_logprobs: list[list[tuple[int, float]]] | None = None

    def __reduce__(self) -> tuple[type[RequestOutput], tuple[object, ...]]:
        # Sent over the engine pipe every step: constructor + values pickle in about half the
        # default's time (a loop over dataclasses.fields dumps slower than the default);
        # test_request_output_pickle.py checks that no field is left out.
        s = self
        return RequestOutput, (
            s.request_id, s.new_token_ids, s.new_text, s.finished, s.finish_reason,
            s.num_prompt_tokens, s.num_output_tokens, s.num_cached_tokens, s.new_logprobs,
        )  # fmt: skip


class _Request:
    def __init__(self, request_id: str, seq: Sequence, detok: IncrementalDetokenizer | None):
        self.request_id = request_id
        self.seq = seq
        self.detok = detok
        self.text = ""  # all output text so far (cut at a stop string)
        self.num_sent_chars = 0
        self.num_checked_chars = 0


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        worker: WorkerClient,
        tokenizer: Tokenizer | None,
        trace: StepTrace | None = None,  # benchmarks: where each step's time went
    ) -> None:
        self.config = config
        self.worker = worker
        self.tokenizer = tokenizer
        self.info = worker.describe()
        self.max_model_len = self._max_model_len()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                block_size=self.info.block_size,
                num_kv_blocks=self.info.num_kv_blocks,
                enable_prefix_caching=config.enable_prefix_caching,
            )
        )
        self.plans = PlanBuilder()
        self._requests: dict[str, _Request] = {}
        self._by_seq_id: dict[int, _Request] = {}
        self._seq_ids = itertools.count()
        self.num_generated_tokens = 0
        self.num_prefill_tokens = 0
        self._num_in_flight = 0  # launched steps whose tokens have not come back yet
        self._num_unanswered = 0  # plans sent whose answers have not been received
        self.timings: dict[str, float] = dict.fromkeys(("plan", "worker", "outputs", "steps"), 0.0)
        self.trace = trace  # owned by whoever built it (one per process, across sessions)
        self._last_answered_end = 0.0
        worker.start_session()

    def _max_model_len(self) -> int:
        capacity = self.info.num_kv_blocks * self.info.block_size
        limit = min(self.info.max_model_len, capacity)
        if self.config.max_model_len is not None:
            if self.config.max_model_len > limit:
                raise ValueError(
                    f"max_model_len={self.config.max_model_len} is invalid: the model and "
                    f"KV cache allow at most {limit}"
                )
            limit = self.config.max_model_len
        return limit

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Admit a request checked at the API edge (request_checks.validate_request): only its
        id's uniqueness is checked here (ValueError); the rest is asserted."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        assert prompt_token_ids, "an empty prompt got past validate_request"
        assert len(prompt_token_ids) + params.max_tokens <= self.max_model_len, "past max_model_len"
        seq = Sequence(next(self._seq_ids), prompt_token_ids, params)
        detok = None
        if self.tokenizer is not None and self.config.detokenize and params.detokenize:
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens
            )
        request = _Request(request_id, seq, detok)
        self._requests[request_id] = request
        self._by_seq_id[seq.seq_id] = request
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._retire(request)
        return True

    def step(self) -> list[RequestOutput]:
        """Run one step: schedule, execute on the worker, and report what changed.

        With async scheduling the worker answers with the previous step's tokens, so stop checks
        act one step late: a finished sequence may have one wasted token computed, never shown
        (``pipeline_depth`` steps late: as many wasted tokens). With ``pipeline_depth`` > 1 a step
        that sends a plan may return without waiting for an answer (no outputs).
        """
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        # An empty plan is sent only to flush a launched step whose answer is not on its way.
        if batch or self._num_in_flight > self._num_unanswered:
            self._submit(batch)
        if not self._num_unanswered:
            return []
        if batch and self._num_unanswered < self.config.pipeline_depth:
            self.timings["plan"] += time.perf_counter() - started
            return []  # room for one more plan before waiting
        planned = time.perf_counter()
        result = self.worker.receive()
        self._num_unanswered -= 1
        answered = time.perf_counter()
        self.timings["plan"] += planned - started
        self.timings["worker"] += answered - planned
        self.timings["steps"] += 1
        if result.step_id < 0:
            return []
        self._num_in_flight -= 1
        outputs = []
        for index, (seq_id, token_id) in enumerate(zip(result.seq_ids, result.token_ids)):
            request = self._by_seq_id.get(seq_id)
            if request is None:
                continue  # retired while its step was in flight: a wasted token
            logprobs = [result.logprobs[index]] if result.logprobs else None
            outputs.append(self._append_token(request, token_id, logprobs))
        end = time.perf_counter()
        self.timings["outputs"] += end - answered
        if self.trace is not None:
            self._trace_step(self.trace, len(outputs), started, planned, answered, end)
        return outputs

    def _trace_step(self, trace: StepTrace, num_outputs: int, *times: float) -> None:
        started, planned, answered, end = times
        if self._last_answered_end:
            trace.note("loop", (started - self._last_answered_end) * 1e3)
        trace.note("plan", (planned - started) * 1e3)
        trace.note("receive", (answered - planned) * 1e3)
        trace.note("outputs", (end - answered) * 1e3)
        trace.add(num_outputs)
        self._last_answered_end = end

    def _submit(self, batch: ScheduledBatch) -> None:
        plan = self.plans.build(batch)
        plan.defer_result = self.config.async_scheduling
        self.num_prefill_tokens += sum(
            n
            for seq, n in zip(batch.seqs, batch.num_new_tokens)
            if seq.num_computed_tokens < seq.num_prompt_tokens
        )
        self.scheduler.on_step_launched(batch)
        self._num_in_flight += bool(batch)
        self.worker.submit(plan)
        self._num_unanswered += 1

    def _append_token(
        self, request: _Request, token_id: int, logprobs: list[list[tuple[int, float]]] | None
    ) -> RequestOutput:
        seq = request.seq
        self.scheduler.on_token(seq, token_id)
        self.num_generated_tokens += 1
        reason = check_stop(seq, token_id, self.info.eos_token_ids, self.max_model_len)
        new_text = ""
        if request.detok is not None:
            request.text += request.detok.step([token_id])
            if reason is not None:
                request.text += request.detok.flush()
            new_text, hit_stop = self._take_text(request, reason is not None)
            if hit_stop:
                reason = FinishReason.STOP
        if reason is not None:
            self._retire(request)
        return RequestOutput(
            request.request_id,
            [token_id],
            new_text,
            reason is not None,
            reason,
            seq.num_prompt_tokens,
            seq.num_known_output_tokens,
            seq.num_cached_tokens,
            logprobs,
        )

    @staticmethod
    def _take_text(request: _Request, finishing: bool) -> tuple[str, bool]:
        """Return the text ready to send and whether a stop string ended the request.

        The text is cut at the first stop string: before it, or after it with
        ``include_stop_str_in_output`` (the earliest match wins; at one position, the first stop
        listed). While streaming, the last ``len(longest stop) - 1`` characters are held back,
        since they may begin one.
        """
        params = request.seq.params
        hold = max((len(s) for s in params.stop), default=1) - 1
        search_from = max(0, request.num_checked_chars - hold)
        found = [(i, len(s)) for s in params.stop if (i := request.text.find(s, search_from)) >= 0]
        request.num_checked_chars = len(request.text)
        cut = -1
        if found:
            cut, length = min(found, key=lambda match: match[0])
            request.text = request.text[: cut + length * params.include_stop_str_in_output]
            finishing = True
        end = (
            len(request.text)
            if finishing
            else max(request.num_sent_chars, len(request.text) - hold)
        )
        new_text = request.text[request.num_sent_chars : end]
        request.num_sent_chars = end
        return new_text, cut >= 0

    def _retire(self, request: _Request) -> None:
        self.scheduler.finish(request.seq)
        self.plans.finished(request.seq.seq_id)
        del self._requests[request.request_id]
        del self._by_seq_id[request.seq.seq_id]
