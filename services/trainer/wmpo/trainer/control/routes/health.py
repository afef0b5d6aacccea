"""``/healthz`` (liveness, Redis reachability) and ``/metrics`` (Prometheus: runs by status, registry aliases)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from wmpo.common.metrics import gauge
from wmpo.common.registry import Registry
from wmpo.trainer.control.deps import Control
from wmpo.trainer.control.runs import ACTIVE, STATUSES, RunRecord

RUNS = gauge("trainer_runs", "Runs in the run store by status.", ["status"])
RUN_ITERATION = gauge("trainer_run_iteration", "Iterations done by each active run.", ["run_id"])
RUN_POLICY_VERSION = gauge(
    "trainer_run_policy_version", "Last policy version published by each active run.", ["run_id"]
)
ALIAS_VERSION = gauge("registry_alias_version", "The version each registry alias points to.", ["kind", "alias"])
VERSIONS = gauge("registry_versions", "Published versions in the registry.", ["kind"])

router = APIRouter(tags=["health"])


def redact_url(url: str) -> str:
    """`url` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@router.get("/healthz", summary="Liveness, and Redis reachability when a Redis URL is set")
def healthz(control: Control) -> JSONResponse:
    body: dict[str, Any] = {"status": "ok"}
    redis_url = control.redis_url
    if redis_url:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
            body["redis"] = "ok"
        except (redis.RedisError, OSError) as exc:
            detail = f"Redis at {redact_url(redis_url)} is unreachable: {exc}"
            return JSONResponse(status_code=503, content={"status": "unavailable", "redis": "down", "detail": detail})
        finally:
            client.close()
    return JSONResponse(content=body)


@router.get("/metrics", summary="Prometheus metrics (runs by status, registry aliases, requests)")
def metrics(control: Control) -> Response:
    _refresh_gauges(control.store.list(), control.registries())
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def _refresh_gauges(records: Sequence[RunRecord], registries: Sequence[Registry]) -> None:
    counts = dict.fromkeys(STATUSES, 0)
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    for status, count in counts.items():
        RUNS.labels(status=status).set(count)
    RUN_ITERATION.clear()
    RUN_POLICY_VERSION.clear()
    for record in records:
        if record.status in ACTIVE:
            RUN_ITERATION.labels(run_id=record.run_id).set(record.iteration)
            if record.policy_version is not None:
                RUN_POLICY_VERSION.labels(run_id=record.run_id).set(record.policy_version)
    ALIAS_VERSION.clear()
    for reg in registries:
        VERSIONS.labels(kind=reg.kind).set(len(reg.list()))
        for alias, version in reg.aliases().items():
            ALIAS_VERSION.labels(kind=reg.kind, alias=alias).set(version)
