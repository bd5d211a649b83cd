"""Commands from the front end to the engine thread, and applying a batch of them to the engine.

The engine process queues ``AddRequest`` and ``AbortRequest`` (``EngineLoop.add`` and ``abort``);
the engine thread applies what has queued between two steps with ``apply_commands``. That touches
only the EngineCore: what the request streams must hear (a refused request's error, an aborted
request's last output) comes back as values for the caller to send to the front end.
Not here: the queue itself and its lock (engine_loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.sampling_params import SamplingParams
from scheduler_service.engine import EngineCore, RequestOutput
from scheduler_service.stop_checker import FinishReason


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


Command = AddRequest | AbortRequest


@dataclass
class Applied:
    refused: list[tuple[str, ValueError]] = field(default_factory=list)  # (request id, why)
    aborted: list[RequestOutput] = field(default_factory=list)  # each ends its request's stream
    num_adds: int = 0  # AddRequests applied (refused ones included)


def apply_commands(engine: EngineCore, commands: list[Command]) -> Applied:
    """Add and abort requests in order; an abort of a request the engine does not hold is a no-op."""
    applied = Applied()
    for cmd in commands:
        if isinstance(cmd, AddRequest):
            applied.num_adds += 1
            try:
                engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
            except ValueError as e:
                applied.refused.append((cmd.request_id, e))
        elif engine.abort(cmd.request_id):
            applied.aborted.append(
                RequestOutput(cmd.request_id, [], "", True, FinishReason.ABORT, 0, 0, 0)
            )
    return applied
