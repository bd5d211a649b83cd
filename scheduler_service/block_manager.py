"""Fixed-size KV blocks: allocation, reference counts and prefix caching.

Invariants (``check_invariants`` asserts them; the property tests drive random workloads):
- a block's ``ref_count`` equals the number of live block tables holding it;
- a block is in the free list exactly when its ``ref_count`` is 0;
- ``hash_to_block[h] == b`` only if block ``b`` holds hash ``h`` and the token ids it was made from.

Prefix caching works on full blocks only. A block's hash chains the previous block's hash with its
token ids (xxhash64), so equal hashes mean equal prefixes. A hash is registered only once the
block's K/V have been computed, and a hit is used only after comparing the stored token ids. A
freed block keeps its hash and contents until it is handed out again (least recently freed first),
so a later request can still hit it.

KV events (for a gateway that routes on the real cache): while ``kv_events`` is a list (a
subscriber exists; None otherwise, and nothing is built), each hash that becomes findable through
``hash_to_block`` appends a ``BlocksStored`` (one per run of consecutive blocks, with the hash of
the block before the run as parent) and each hash that stops being findable (evicted or flushed)
a ``BlocksRemoved``. ``reset_prefix_cache`` flushes every cached hash, as vLLM's
``reset_prefix_cache`` does: only when no block is in use, else it refuses and changes nothing.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import xxhash

from scheduler_service.sequence import Sequence

_NO_HASH = -1


def chain_hash(prev_hash: int, token_ids: list[int]) -> int:
    """xxhash64 over the previous block's hash and this block's token ids (int32 bytes)."""
    h = xxhash.xxh64()
    h.update((prev_hash & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))
    h.update(array("i", token_ids).tobytes())
    return h.intdigest()


@dataclass(frozen=True)
class BlocksStored:
    block_hashes: list[int]  # unsigned 64-bit chained hashes, in prefix order
    token_ids: list[list[int]]  # each block's token ids
    parent_hash: int | None  # the hash of the block before the first; None at the prompt start


@dataclass(frozen=True)
class BlocksRemoved:
    block_hashes: list[int]


@dataclass(frozen=True)
class CacheCleared:
    """Every earlier block is gone (a fresh worker session): forget them all."""


KvEvent = BlocksStored | BlocksRemoved | CacheCleared


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash = _NO_HASH
        self.token_ids: list[int] = []


class BlockManager:
    """Hands out blocks to sequences; never decides which sequences run (the Scheduler does)."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))  # ordered: LRU first
        self._seq_hashes: dict[int, list[int]] = {}  # seq_id -> chained hashes of its full blocks
        self._num_committed: dict[int, int] = {}  # seq_id -> leading blocks already committed
        self.num_cache_hit_tokens = 0
        self.num_cache_query_tokens = 0
        self.kv_events: list[KvEvent] | None = None  # collected only while a list (see above)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Returns False (changing nothing) when the free blocks do not suffice. Sets
        ``num_cached_tokens`` and ``num_computed_tokens``; the last token is always left to compute.
        """
        assert not seq.block_table, "allocate() is for sequences holding no blocks"
        hit_ids = self._lookup_prefix(seq)
        num_new = self.num_blocks_for(seq.num_tokens) - len(hit_ids)
        num_revived = sum(1 for b in hit_ids if self.blocks[b].ref_count == 0)
        if num_new + num_revived > self.num_free_blocks:
            return False
        for block_id in hit_ids:
            self._take(block_id)
        seq.block_table = hit_ids + [self._take_free() for _ in range(num_new)]
        num_cached = min(len(hit_ids) * self.block_size, seq.num_tokens - 1)
        seq.num_cached_tokens = seq.num_computed_tokens = num_cached
        self.num_cache_hit_tokens += num_cached
        self.num_cache_query_tokens += seq.num_tokens
        return True

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold ``num_tokens`` tokens; False (changing nothing) if it can't."""
        num_new = self.num_blocks_for(num_tokens) - len(seq.block_table)
        if num_new > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take_free() for _ in range(num_new))
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full and computed, for later prefix hits."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        start = self._num_committed.get(seq.seq_id, 0)
        if num_full <= start:
            return
        hashes = self._hashes_of(seq, num_full)
        self._num_committed[seq.seq_id] = num_full
        recording = self.kv_events is not None
        stored: list[int] = []  # indexes whose hash became findable (only while recording)
        for index in range(start, num_full):
            block_hash = hashes[index]
            block = self.blocks[seq.block_table[index]]
            if block.hash == _NO_HASH:
                block.hash = block_hash
                block.token_ids = seq.block_token_ids(index, self.block_size)
                if recording and block_hash not in self.hash_to_block:
                    stored.append(index)
                self.hash_to_block[block_hash] = block.block_id
        if stored:
            self._record_stored(seq, hashes, stored)

    def _record_stored(self, seq: Sequence, hashes: list[int], indexes: list[int]) -> None:
        """One BlocksStored per run of consecutive block indexes."""
        assert self.kv_events is not None
        runs: list[list[int]] = []
        for index in indexes:
            if runs and runs[-1][-1] == index - 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        for run in runs:
            parent = hashes[run[0] - 1] if run[0] > 0 else None
            token_ids = [self.blocks[seq.block_table[i]].token_ids for i in run]
            self.kv_events.append(BlocksStored([hashes[i] for i in run], token_ids, parent))

    def _record_removed(self, block_hash: int) -> None:
        """Evictions in a row share one BlocksRemoved."""
        assert self.kv_events is not None
        if self.kv_events and isinstance(self.kv_events[-1], BlocksRemoved):
            self.kv_events[-1].block_hashes.append(block_hash)
        else:
            self.kv_events.append(BlocksRemoved([block_hash]))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash, so no later request hits; False (changing nothing) while any
        block is in use, as vLLM refuses: a running sequence's blocks must keep their hashes."""
        if self.num_free_blocks != self.num_blocks:
            return False
        if self.kv_events is not None and self.hash_to_block:
            self.kv_events.append(BlocksRemoved(list(self.hash_to_block)))
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash = _NO_HASH
            block.token_ids = []
        return True

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finished, aborted or preempted). Contents stay cached."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._num_committed.pop(seq.seq_id, None)

    def forget(self, seq: Sequence) -> None:
        """Drop the hashes memoised for a sequence that will never come back."""
        self._seq_hashes.pop(seq.seq_id, None)

    def _hashes_of(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        while len(hashes) < num_full_blocks:
            prev = hashes[-1] if hashes else _NO_HASH
            hashes.append(chain_hash(prev, seq.block_token_ids(len(hashes), self.block_size)))
        return hashes  # the first num_full_blocks entries are the ones asked for

    def _lookup_prefix(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        hit_ids: list[int] = []
        num_full = seq.num_tokens // self.block_size
        for index, block_hash in enumerate(self._hashes_of(seq, num_full)[:num_full]):
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None:
                break
            if self.blocks[block_id].token_ids != seq.block_token_ids(index, self.block_size):
                break  # a hash collision must never corrupt output
            hit_ids.append(block_id)
        return hit_ids

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id = next(iter(self._free))
        del self._free[block_id]
        block = self.blocks[block_id]
        if block.hash != _NO_HASH:  # evict its cached contents
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
                if self.kv_events is not None:
                    self._record_removed(block.hash)
            block.hash = _NO_HASH
            block.token_ids = []
        block.ref_count = 1
        return block_id

    def check_invariants(self, live_seqs: list[Sequence]) -> None:
        """Assert the invariants in the module docstring against the live sequences."""
        counts = [0] * self.num_blocks
        for seq in live_seqs:
            for block_id in seq.block_table:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], f"block {block.block_id} ref_count"
            assert (block.ref_count == 0) == (block.block_id in self._free), "free list"
        for block_hash, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == block_hash, "hash map"
