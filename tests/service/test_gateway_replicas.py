"""Two nanoserve replicas behind the SMG gateway: cache-aware routing, and losing a replica.

Real processes, nothing mocked: two replicas (a CPU worker and a scheduler each, on OS-chosen
loopback ports) and ``smg launch`` in front, reached with the ``openai`` client. The workload is
prefix_share-style: 4 long shared prefixes x 8 requests each, in a fixed shuffled order, sent
one at a time so each request's replica shows in the replicas' GetServerStatus counters.
With ``--policy cache_aware`` every prefix stays on one replica, the gateway's KV index holds
blocks of both replicas learnt from their SubscribeKvEvents streams (SMG's own metrics), and the
cached fraction of the prompt tokens beats round_robin's on the same requests (both printed; each run starts on flushed
caches). After ``kill -9`` of the replica holding a prefix, every request (that prefix's first)
is answered 200 by the other.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from openai import OpenAI
from smg_grpc_proto.generated import common_pb2 as cpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from nanoserve import launcher
from protos.nanoserve.v1 import generation_pb2_grpc
from tests.gateway_fixtures import running_gateway
from tests.service_fixtures import pb, start_scheduler, start_worker

NUM_KV_BLOCKS = 256
NUM_PREFIXES, NUM_PER_PREFIX = 4, 8
WORDS = "river stone cloud lamp garden window silver morning paper engine forest bridge".split()


@dataclass
class Replica:
    worker: launcher.ServiceProcess
    scheduler: launcher.ServiceProcess
    channel: grpc.Channel

    @property
    def addr(self) -> str:
        return self.scheduler.addr

    def status(self) -> pb.GetServerStatusResponse:
        stub = generation_pb2_grpc.GenerationStub(self.channel)
        return stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=5)

    def flush(self) -> None:
        engine = vllm_engine_pb2_grpc.VllmEngineStub(self.channel)
        answer = engine.FlushCache(cpb.FlushCacheRequest(timeout_s=10), timeout=30)
        assert answer.success, answer.message

    def kill(self) -> None:
        for service in (self.scheduler, self.worker):
            service.proc.send_signal(signal.SIGKILL)
            service.proc.wait(10)


@pytest.fixture(scope="module")
def replicas(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Replica]]:
    run_dir = tmp_path_factory.mktemp("gateway_replicas")
    started: list[launcher.ServiceProcess] = []
    replicas: list[Replica] = []
    try:
        for index in range(2):
            env = launcher.secret_env()
            worker = start_worker(
                tiny_model_dir, run_dir, NUM_KV_BLOCKS, name=f"worker{index}", env=env
            )
            started.append(worker)
            scheduler = start_scheduler(
                tiny_model_dir, [worker.addr], run_dir, env=env, name=f"scheduler{index}"
            )
            started.append(scheduler)
            launcher.wait_until_serving(scheduler.addr, 60)
            replicas.append(Replica(worker, scheduler, grpc.insecure_channel(scheduler.addr)))
        yield replicas
    finally:
        for replica in replicas:
            replica.channel.close()
        launcher.stop_all(started)


def workload(seed: int = 0) -> list[tuple[int, str]]:
    """(prefix index, prompt): 4 long prefixes (~30 blocks of tokens) x 8 distinct questions."""
    rng = random.Random(seed)
    prefixes = [
        f"Document {p}: " + " ".join(rng.choice(WORDS) for _ in range(200))
        for p in range(NUM_PREFIXES)
    ]
    requests = [
        (p, f"{prefixes[p]}\nQuestion {q}: what comes next?")
        for p in range(NUM_PREFIXES)
        for q in range(NUM_PER_PREFIX)
    ]
    rng.shuffle(requests)
    return requests


@dataclass
class Placement:
    replica_of: list[tuple[int, int]]  # (prefix index, replica index) per request
    hit_tokens: list[int]  # per replica: prompt tokens served from its prefix cache
    cached_fraction: float  # prompt tokens served from the prefix cache / prompt tokens


def serve_one(client: OpenAI, replicas: list[Replica], prompt: str) -> int:
    """Complete ``prompt`` through the gateway; the index of the replica that served it."""
    counts = [r.status().num_prefix_cache_query_tokens for r in replicas]
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=2)
    assert completion.choices[0].finish_reason in ("length", "stop")
    grown = [
        i for i, r in enumerate(replicas) if r.status().num_prefix_cache_query_tokens > counts[i]
    ]
    assert len(grown) == 1, f"the request should show on exactly one replica: {grown}"
    return grown[0]


def run_workload(client: OpenAI, replicas: list[Replica]) -> Placement:
    before = [r.status() for r in replicas]
    replica_of = [(prefix, serve_one(client, replicas, prompt)) for prefix, prompt in workload()]
    after = [r.status() for r in replicas]
    hits = [
        a.num_prefix_cache_hit_tokens - b.num_prefix_cache_hit_tokens for a, b in zip(after, before)
    ]
    queried = [
        a.num_prefix_cache_query_tokens - b.num_prefix_cache_query_tokens
        for a, b in zip(after, before)
    ]
    return Placement(replica_of, hits, sum(hits) / sum(queried))


def test_cache_aware_keeps_each_prefix_on_one_replica_and_caches_more_than_round_robin(
    replicas: list[Replica], tiny_model_dir: Path, tmp_path: Path
) -> None:
    placements = {}
    for policy in ("round_robin", "cache_aware"):
        for replica in replicas:
            replica.flush()
        addrs = [r.addr for r in replicas]
        with running_gateway(addrs, tiny_model_dir, tmp_path, policy) as gateway:
            client = OpenAI(base_url=gateway.base_url, api_key="x", timeout=60)
            placements[policy] = run_workload(client, replicas)
            if policy == "cache_aware":  # it routed on the replicas' own KV events
                for addr in addrs:
                    worker = f"grpc://{addr}"
                    assert gateway.metric("smg_kv_index_blocks", worker=worker) > 0, worker
                    applied = gateway.metric(
                        "smg_kv_event_batches_total", worker=worker, disposition="applied"
                    )
                    assert applied > 0, worker
                assert gateway.metric("smg_kv_event_parentless_blocks_total") == 0
    for policy, placement in placements.items():
        per_replica = [sum(1 for _, r in placement.replica_of if r == i) for i in range(2)]
        print(
            f"{policy}: cached fraction {placement.cached_fraction:.3f}, requests per replica "
            f"{per_replica}, prefix-hit tokens per replica {placement.hit_tokens}"
        )
    cache_aware, round_robin = placements["cache_aware"], placements["round_robin"]
    for prefix in range(NUM_PREFIXES):
        homes = {r for p, r in cache_aware.replica_of if p == prefix}
        assert len(homes) == 1, f"prefix {prefix} went to replicas {homes}"
    assert {r for _, r in round_robin.replica_of} == {0, 1}  # control: both replicas serve
    assert cache_aware.cached_fraction > round_robin.cached_fraction


def test_after_kill_9_of_the_replica_holding_a_prefix_the_other_answers(
    replicas: list[Replica], tiny_model_dir: Path, tmp_path: Path
) -> None:
    for replica in replicas:
        replica.flush()
    addrs = [r.addr for r in replicas]
    with running_gateway(addrs, tiny_model_dir, tmp_path, "cache_aware") as gateway:
        client = OpenAI(base_url=gateway.base_url, api_key="x", timeout=60, max_retries=0)
        model = client.models.list().data[0].id
        requests = workload()
        victim = serve_one(client, replicas, requests[0][1])  # now holds that prefix's blocks
        replicas[victim].kill()
        survivor = replicas[1 - victim]
        before = survivor.status().num_prefix_cache_query_tokens
        for prefix, prompt in requests[:8]:  # the dead replica's prefix first
            response = client.completions.with_raw_response.create(
                model=model, prompt=prompt, temperature=0, max_tokens=2
            )
            assert response.status_code == 200, prefix
            assert response.parse().choices[0].finish_reason in ("length", "stop")
        assert survivor.status().num_prefix_cache_query_tokens > before
