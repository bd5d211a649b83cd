"""Commands from the front end to the engine thread, and applying a batch of them to the engine.

The engine process queues ``AddRequest``, ``AbortRequest`` and ``FlushCache`` (``EngineLoop.add``,
``abort`` and ``flush``); the engine thread applies what has queued between two steps with
``apply_commands``, in order. That touches only the EngineCore: what the front end must hear (a
refused request's error, an aborted request's last output, whether a flush happened) comes back
as values for the caller to send on. A flush forgets every cached prefix block only while no
block is in use (BlockManager.reset_prefix_cache, as vLLM's): a request added before it in the
same batch holds no block yet, so it does not stop the flush.
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


@dataclass(frozen=True)
class FlushCache:
    flush_id: int  # the front end's, to match the answer


Command = AddRequest | AbortRequest | FlushCache


@dataclass
class Applied:
    refused: list[tuple[str, ValueError]] = field(default_factory=list)  # (request id, why)
    aborted: list[RequestOutput] = field(default_factory=list)  # each ends its request's stream
    num_adds: int = 0  # AddRequests applied (refused ones included)
    flushed: list[tuple[int, bool]] = field(default_factory=list)  # (flush id, done)


def apply_commands(engine: EngineCore, commands: list[Command]) -> Applied:
    """Add and abort requests and flush the prefix cache in order; an abort of a request the
    engine does not hold is a no-op."""
    applied = Applied()
    for cmd in commands:
        if isinstance(cmd, AddRequest):
            applied.num_adds += 1
            try:
                engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
            except ValueError as e:
                applied.refused.append((cmd.request_id, e))
        elif isinstance(cmd, FlushCache):
            done = engine.scheduler.block_manager.reset_prefix_cache()
            applied.flushed.append((cmd.flush_id, done))
        elif engine.abort(cmd.request_id):
            applied.aborted.append(
                RequestOutput(cmd.request_id, [], "", True, FinishReason.ABORT, 0, 0, 0)
            )
    return applied
