"""A decode step's fixed host costs stay off the per-step path.

The memory a worker reports with every step is measured at most every MEMORY_REFRESH_S (on a GPU
reading the allocator's statistics cost a fifth of a batch-1 step's host time), and the sampled
tokens' device-to-host copies go into pinned buffers used in turn, not a fresh pinned tensor each.
"""

from __future__ import annotations

import torch

from worker_service import worker as worker_module
from worker_service.batch_inputs import PinnedRing
from worker_service.config import WorkerConfig
from worker_service.worker import MEMORY_REFRESH_S, Worker


def test_memory_is_read_again_only_after_the_refresh_interval(tiny_model_dir, monkeypatch) -> None:
    worker = Worker(WorkerConfig(model_dir=str(tiny_model_dir), device="cpu"))
    clock = [1000.0]
    reads = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        if path == "/proc/self/statm":
            reads.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(worker_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr("builtins.open", counting_open)
    first = worker.memory_bytes()
    assert first > 10 * 2**20 and len(reads) == 1  # a CPU worker's resident set
    clock[0] += MEMORY_REFRESH_S / 2
    assert worker.memory_bytes() == first and len(reads) == 1  # within the interval: cached
    clock[0] += MEMORY_REFRESH_S
    assert worker.memory_bytes() > 0 and len(reads) == 2  # read again


def test_pinned_ring_hands_its_buffers_out_in_turn() -> None:
    ring = PinnedRing(8, torch.int64, pin=torch.cuda.is_available())  # pinning needs CUDA
    outs = [ring.copy(torch.full((3,), i)) for i in range(5)]
    assert [o.tolist() for o in outs[1:4]] == [[1] * 3, [2] * 3, [3] * 3]
    assert outs[4].data_ptr() == outs[0].data_ptr()  # the fifth copy reuses the first buffer
    assert outs[0].tolist() == [4] * 3
    assert len({o.data_ptr() for o in outs[:4]}) == 4
