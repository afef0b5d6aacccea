#!/usr/bin/env python3
"""Container health checks for the wmpo images (installed as ``wmpo-healthcheck``), so that no image needs
curl or grpc_health_probe. Exit 0 means healthy; otherwise one line on stderr says why.

    wmpo-healthcheck http URL                 GET URL answers 2xx (Triton /v2/health/ready, /healthz, /metrics)
    wmpo-healthcheck grpc HOST:PORT [SERVICE] the standard gRPC health service answers SERVING
    wmpo-healthcheck wait [--timeout S] PATH...  wait until every PATH exists (init containers)
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 3.0
POLL_S = 5.0


def check_http(url: str) -> str | None:
    """None when `url` answers 2xx, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = int(response.status)
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"
    return None if 200 <= status < 300 else f"{url}: HTTP {status}"


def check_grpc(address: str, service: str = "") -> str | None:
    """None when the gRPC health service at `address` reports `service` as SERVING, else the reason."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
        except grpc.RpcError as exc:
            return f"{address}: {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def wait_for(paths: list[str], timeout_s: float) -> str | None:
    """None once every path exists; the missing ones after `timeout_s` (0 = wait forever)."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [p for p in paths if not Path(p).exists()]
        if not missing:
            return None
        left = deadline - time.monotonic()
        if timeout_s and left <= 0:
            return f"still missing after {timeout_s:g}s: {', '.join(missing)}"
        print(f"waiting for {', '.join(missing)}", file=sys.stderr, flush=True)
        time.sleep(min(POLL_S, left) if timeout_s else POLL_S)


def main(argv: list[str]) -> int:
    """Run one check; 0 = healthy, 1 = unhealthy, 2 = usage error."""
    if len(argv) >= 2 and argv[0] == "http":
        problem = check_http(argv[1])
    elif len(argv) >= 2 and argv[0] == "grpc":
        problem = check_grpc(argv[1], argv[2] if len(argv) > 2 else "")
    elif argv[:1] == ["wait"]:
        args = argv[1:]
        timeout_s = 0.0
        if args[:1] == ["--timeout"] and len(args) >= 2:
            timeout_s, args = float(args[1]), args[2:]
        if not args:
            print(__doc__, file=sys.stderr)
            return 2
        problem = wait_for(args, timeout_s)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
