"""The VllmEngine servicer's prefix-cache RPCs: FlushCache's wait and SubscribeKvEvents' messages.

FlushCache (``smg.grpc.common.FlushCacheRequest``): "invalidate the local KV prefix cache without
preempting requests". A flush happens only while no KV block is in use (as vLLM's
``reset_prefix_cache``, which refuses rather than touch a running request's blocks); with
``timeout_s`` > 0 it is retried until the engine goes idle or the time is up, and the answer says
which. SubscribeKvEvents: each ``KvEventBatch`` of the hub (kv_event_hub.py) as
``smg.grpc.common.KvEventBatch``: a run of stored blocks is one ``KvBlocksStored`` (hashes,
token ids, block size, parent hash), evicted or flushed hashes one ``KvBlocksRemoved``, a fresh
worker session a ``KvCacheCleared``. Our hashes are unsigned 64-bit xxhash; the wire's int64
carries the same bits (two's complement).
Not here: the servicer (vllm_engine.py), the events themselves (block_manager.py).
"""

from __future__ import annotations

import asyncio
import time

from smg_grpc_proto.generated import common_pb2 as cpb

from scheduler_service.block_manager import BlocksRemoved, BlocksStored, KvEvent
from scheduler_service.engine_client import EngineClient
from scheduler_service.kv_event_hub import KvEventBatch

FLUSH_RETRY_S = 0.05


async def flush_cache(client: EngineClient, timeout_s: float) -> tuple[bool, str]:
    """Flush now, or as soon as no block is in use within ``timeout_s``: (success, message)."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        if await client.flush_cache():
            return True, "prefix cache flushed"
        if not client.ready:
            return False, "not flushed: no worker session is up"
        if time.monotonic() + FLUSH_RETRY_S > deadline:
            return False, (
                f"not flushed: KV blocks are in use by requests in flight (waited {timeout_s:g} s)"
            )
        await asyncio.sleep(FLUSH_RETRY_S)


def to_int64(block_hash: int) -> int:
    """An unsigned 64-bit hash as the int64 with the same bits."""
    return block_hash - (1 << 64) if block_hash >= 1 << 63 else block_hash


def kv_batch_to_pb(batch: KvEventBatch, block_size: int) -> cpb.KvEventBatch:
    events = [kv_event_to_pb(event, block_size) for event in batch.events]
    return cpb.KvEventBatch(
        sequence_number=batch.sequence_number, timestamp=batch.timestamp, events=events, dp_rank=0
    )


def kv_event_to_pb(event: KvEvent, block_size: int) -> cpb.KvCacheEvent:
    if isinstance(event, BlocksStored):
        blocks = [
            cpb.KvBlock(block_hash=to_int64(h), token_ids=ids, block_size=block_size)
            for h, ids in zip(event.block_hashes, event.token_ids, strict=True)
        ]
        stored = cpb.KvBlocksStored(
            blocks=blocks,
            tier=cpb.KV_CACHE_TIER_DEVICE,
            locality=cpb.KV_CACHE_LOCALITY_LOCAL,
        )
        if event.parent_hash is not None:
            stored.parent_block_hash = to_int64(event.parent_hash)
        return cpb.KvCacheEvent(stored=stored)
    if isinstance(event, BlocksRemoved):
        hashes = [to_int64(h) for h in event.block_hashes]
        removed = cpb.KvBlocksRemoved(
            block_hashes=hashes, tier=cpb.KV_CACHE_TIER_DEVICE, locality=cpb.KV_CACHE_LOCALITY_LOCAL
        )
        return cpb.KvCacheEvent(removed=removed)
    return cpb.KvCacheEvent(cleared=cpb.KvCacheCleared())
