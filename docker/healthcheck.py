"""Container health probe: exit 0 when a gRPC health service reports SERVING, else 1.

``python healthcheck.py [--addr HOST:PORT] [--service NAME]``; defaults come from the
environment the images set (NANOSERVE_HEALTH_ADDR, NANOSERVE_HEALTH_SERVICE), so compose can run
it with no arguments. The scheduler's readiness service is ``nanoserve.v1.Generation`` (SERVING
once its workers are connected); a worker's is ``nanoserve.worker.v1.Worker`` (SERVING once the
model and KV cache are loaded). This is readiness, not a port check.

``--url URL`` (or NANOSERVE_HEALTH_URL) probes an HTTP endpoint instead: exit 0 on a 200. The
gateway image uses it for SMG's ``/readiness`` (200 once a worker is registered; its ``/health``
answers before that).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default=os.environ.get("NANOSERVE_HEALTH_ADDR", "127.0.0.1:50051"))
    p.add_argument("--service", default=os.environ.get("NANOSERVE_HEALTH_SERVICE", ""))
    p.add_argument("--url", default=os.environ.get("NANOSERVE_HEALTH_URL", ""))
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = p.parse_args(argv)
    if args.url:
        return check_http(args.url, args.timeout)
    with grpc.insecure_channel(args.addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"{args.addr} {args.service!r}: {e.code().name} {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.addr} {args.service!r}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def check_http(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            status = reply.status
    except (urllib.error.URLError, OSError) as e:
        print(f"{url}: {e}", file=sys.stderr)
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
