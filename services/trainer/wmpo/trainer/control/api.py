"""The trainer's control plane: a FastAPI app over the run store and the version registries.

Reads are open; every POST needs ``Authorization: Bearer <token>`` when a token is configured.
Errors are 4xx with a JSON ``{"detail": "..."}`` saying what to fix. ``GET /`` is a self-contained
HTML dashboard (runs, versions, per-run SVG plots and imagined-rollout GIFs); OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

import hmac
import html
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import redis
import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field

from wmpo.common import __version__
from wmpo.common.auth import first_token
from wmpo.common.errors import UserError
from wmpo.common.logs import get_logger
from wmpo.common.metrics import counter, gauge, histogram
from wmpo.common.registry import Registry, VersionNotFoundError
from wmpo.trainer.control.plots import svg_plot
from wmpo.trainer.control.runs import (
    ACTIVE,
    STATUSES,
    InvalidRunIdError,
    RunExistsError,
    RunNotFoundError,
    RunRecord,
    RunStore,
)
from wmpo.trainer.settings import TrainerSettings

KINDS = ("policy", "worldmodel", "reward")
PREFERRED_PLOTS = (
    "imagined_success_rate", "real_success_rate", "loss", "approx_kl", "entropy", "clip_fraction", "kept_groups",
)  # fmt: skip
"""Metrics plotted first on a run's page; every other numeric metric follows, up to `MAX_PLOTS`."""
MAX_PLOTS = 16
MAX_VIDEOS = 24
NOT_PLOTTED = frozenset({"iteration", "time", "timestamp", "wall_time", "policy_version", "new_policy_version"})

log = get_logger(__name__)
BEARER = HTTPBearer(auto_error=False, description="The token in the server's api_token_file.")

RUNS = gauge("trainer_runs", "Runs in the run store by status.", ["status"])
RUN_ITERATION = gauge("trainer_run_iteration", "Iterations done by each active run.", ["run_id"])
RUN_POLICY_VERSION = gauge(
    "trainer_run_policy_version", "Last policy version published by each active run.", ["run_id"]
)
ALIAS_VERSION = gauge("registry_alias_version", "The version each registry alias points to.", ["kind", "alias"])
VERSIONS = gauge("registry_versions", "Published versions in the registry.", ["kind"])
REQUESTS = counter("trainer_api_requests", "Control-plane HTTP requests.", ["method", "route", "code"])
LATENCY = histogram("trainer_api_request_seconds", "Control-plane HTTP request latency.", ["route"])


class RunCreate(BaseModel):
    """A new run."""

    config: str | dict[str, Any] = Field(description="The run config: YAML text or the same as a JSON object.")
    run_id: str | None = Field(default=None, description="Run id ([a-z0-9][a-z0-9._-]{0,62}); generated if absent.")
    start: bool = Field(default=True, description="Start the learner right away.")


class Promote(BaseModel):
    """Point an alias at a version."""

    version: str | int = Field(description="Version number or alias to promote.")
    alias: str = Field(default="stable", description="Alias to move.")


class Rollback(BaseModel):
    """Move an alias back to its previous version."""

    alias: str = Field(default="latest", description="Alias to move back.")


def redact_url(url: str) -> str:
    """`url` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def create_app(
    settings: TrainerSettings,
    token: str | None,
    *,
    store: RunStore | None = None,
    stop_timeout: float = 30.0,
) -> FastAPI:
    """The control-plane app; `store` defaults to a `RunStore` over ``settings.runs_dir``."""
    runs = store if store is not None else RunStore(settings.runs_dir)
    redis_url = settings.redis_url or None
    app = FastAPI(
        title="WMPO trainer control plane",
        description=(
            "Start, watch and stop WMPO training runs; list, promote and roll back policy, world-model and "
            "reward-model versions. Reads are open; POST endpoints need `Authorization: Bearer <token>` when "
            "the server has a token. The dashboard is at `/`, Prometheus metrics at `/metrics`."
        ),
        version=__version__,
    )

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if token is None:
            return
        given = credentials.credentials.strip().encode() if credentials is not None else b""
        if credentials is None or not hmac.compare_digest(given, token.encode()):
            raise HTTPException(
                401,
                detail="missing or invalid bearer token: send the header 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    auth = Depends(authorize)

    def registry(kind: str, *, notify: bool = False) -> Registry:
        if kind not in KINDS:
            raise HTTPException(400, detail=f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
        return Registry(settings.registry_dir, kind, redis_url if notify else None)

    # -- errors and request metrics ------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in err.get('loc', ())) or 'request'}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        ]
        errors = [
            {"loc": list(err.get("loc", ())), "msg": err.get("msg"), "type": err.get("type")} for err in exc.errors()
        ]
        return JSONResponse(
            status_code=422, content={"detail": "invalid request: " + "; ".join(problems), "errors": errors}
        )

    @app.exception_handler(RunNotFoundError)
    async def _no_run(_request: Request, exc: RunNotFoundError) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": f"{exc} (GET /runs lists the runs)"})

    @app.exception_handler(InvalidRunIdError)
    async def _bad_run_id(_request: Request, exc: InvalidRunIdError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(VersionNotFoundError)
    async def _no_version(_request: Request, exc: VersionNotFoundError) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc.args[0]) if exc.args else "no such version"})

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        REQUESTS.labels(method=request.method, route=route, code=str(response.status_code)).inc()
        LATENCY.labels(route=route).observe(time.perf_counter() - start)
        return response

    # -- health and metrics --------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"], summary="Liveness, and Redis reachability when a Redis URL is set")
    def healthz() -> JSONResponse:
        body: dict[str, Any] = {"status": "ok"}
        if redis_url:
            client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
            try:
                client.ping()
                body["redis"] = "ok"
            except (redis.RedisError, OSError) as exc:
                detail = f"Redis at {redact_url(redis_url)} is unreachable: {exc}"
                return JSONResponse(
                    status_code=503, content={"status": "unavailable", "redis": "down", "detail": detail}
                )
            finally:
                client.close()
        return JSONResponse(content=body)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (runs by status, registry aliases, requests)")
    def metrics() -> Response:
        _refresh_gauges(runs.list(), [registry(kind) for kind in KINDS])
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # -- runs ----------------------------------------------------------------------------------------
    @app.get("/runs", tags=["runs"], summary="Every run, newest first")
    def list_runs() -> list[dict[str, Any]]:
        return [r.to_json() for r in runs.list()]

    @app.post("/runs", tags=["runs"], status_code=201, dependencies=[auth], summary="Create (and start) a run")
    def create_run(body: RunCreate) -> dict[str, Any]:
        text = body.config if isinstance(body.config, str) else yaml.safe_dump(body.config, sort_keys=False)
        try:
            record = runs.create(text, body.run_id)
        except InvalidRunIdError as exc:
            raise HTTPException(422, detail=str(exc)) from None
        except RunExistsError as exc:
            raise HTTPException(409, detail=f"{exc}: choose another run_id") from None
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc)) from None
        if body.start:
            record = _start(record.run_id)
        return record.to_json()

    def _start(run_id: str) -> RunRecord:
        try:
            return runs.start(run_id)
        except RunExistsError as exc:
            raise HTTPException(409, detail=str(exc)) from None
        except OSError as exc:
            log.error("cannot start the learner", run_id=run_id, error=str(exc))
            return runs.update(run_id, status="failed", error=f"cannot start the learner: {exc}")

    @app.get("/runs/{run_id}", tags=["runs"], summary="A run's status and its last metrics record")
    def get_run(run_id: str) -> dict[str, Any]:
        record = runs.get(run_id)
        history = runs.metrics(run_id)
        return {**record.to_json(), "last_metrics": history[-1] if history else None}

    @app.get("/runs/{run_id}/metrics", tags=["runs"], summary="Every metrics record of a run, oldest first")
    def get_metrics(run_id: str) -> list[dict[str, Any]]:
        return runs.metrics(run_id)

    @app.get("/runs/{run_id}/log", tags=["runs"], response_class=PlainTextResponse, summary="The tail of train.log")
    def get_log(run_id: str, lines: Annotated[int, Query(ge=1, le=10_000)] = 200) -> str:
        path = runs.get(run_id).log_path
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) + "\n"

    @app.get("/runs/{run_id}/videos", tags=["runs"], summary="Names of a run's imagined-rollout GIFs")
    def list_videos(run_id: str) -> list[str]:
        return runs.videos(run_id)

    @app.get("/runs/{run_id}/videos/{name}", tags=["runs"], response_class=FileResponse, summary="One GIF")
    def get_video(run_id: str, name: str) -> FileResponse:
        try:
            path = runs.video_path(run_id, name)
        except FileNotFoundError as exc:
            raise HTTPException(404, detail=f"{exc} (GET /runs/{run_id}/videos lists them)") from None
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc)) from None
        return FileResponse(path, media_type="image/gif")

    @app.post("/runs/{run_id}/start", tags=["runs"], dependencies=[auth], summary="(Re)start a run's learner")
    def start_run(run_id: str) -> dict[str, Any]:
        runs.get(run_id)
        return _start(run_id).to_json()

    @app.post(
        "/runs/{run_id}/stop",
        tags=["runs"],
        status_code=202,
        dependencies=[auth],
        summary="Ask the learner to stop at a safe point (SIGTERM; SIGKILL after the stop timeout)",
    )
    def stop_run(run_id: str) -> dict[str, Any]:
        try:
            record = runs.request_stop(run_id)
        except ValueError as exc:
            raise HTTPException(409, detail=str(exc)) from None
        if record.pid is not None:
            threading.Thread(
                target=runs.wait_stopped,
                args=(run_id, record.process, stop_timeout),
                name=f"stop-{run_id}",
                daemon=True,
            ).start()
        return record.to_json()

    # -- versions ------------------------------------------------------------------------------------
    @app.get("/versions", tags=["versions"], summary="Published versions and aliases of one kind")
    def list_versions(kind: str = "policy") -> dict[str, Any]:
        reg = registry(kind)
        aliases = reg.aliases()
        versions = [
            {**info.to_json(), "aliases": sorted(a for a, v in aliases.items() if v == info.version)}
            for info in reg.list()
        ]
        return {"kind": kind, "aliases": aliases, "versions": versions}

    @app.post("/versions/{kind}/promote", tags=["versions"], dependencies=[auth], summary="Point an alias at a version")
    def promote(kind: str, body: Promote) -> dict[str, Any]:
        reg = registry(kind, notify=True)
        try:
            version = reg.set_alias(body.alias, body.version)
        except UserError as exc:
            raise HTTPException(400, detail=str(exc)) from None
        except redis.RedisError as exc:
            return _moved_without_notice(reg, body.alias, exc)
        log.info("alias moved", kind=kind, alias=body.alias, version=version)
        return {"kind": kind, "alias": body.alias, "version": version, "notified": redis_url is not None}

    @app.post(
        "/versions/{kind}/rollback",
        tags=["versions"],
        dependencies=[auth],
        summary="Move an alias back to the version it pointed to before its last move",
    )
    def rollback(kind: str, body: Rollback) -> dict[str, Any]:
        reg = registry(kind, notify=True)
        try:
            version = reg.rollback(body.alias)
        except UserError as exc:
            raise HTTPException(409, detail=str(exc)) from None
        except redis.RedisError as exc:
            return _moved_without_notice(reg, body.alias, exc)
        log.info("alias rolled back", kind=kind, alias=body.alias, version=version)
        return {"kind": kind, "alias": body.alias, "version": version, "notified": redis_url is not None}

    def _moved_without_notice(reg: Registry, alias: str, exc: Exception) -> dict[str, Any]:
        version = reg.resolve(alias)
        log.warning("alias moved but Redis was not notified", kind=reg.kind, alias=alias, error=str(exc))
        warning = f"the alias moved, but Redis could not be notified ({exc}); services polling the registry follow"
        return {"kind": reg.kind, "alias": alias, "version": version, "notified": False, "warning": warning}

    # -- dashboard -----------------------------------------------------------------------------------
    @app.get("/", tags=["dashboard"], response_class=HTMLResponse, summary="Dashboard: runs and versions")
    def dashboard() -> HTMLResponse:
        return HTMLResponse(render_index(runs.list(), [registry(kind) for kind in KINDS]))

    @app.get("/runs/{run_id}/view", tags=["dashboard"], response_class=HTMLResponse, summary="Dashboard: one run")
    def run_view(run_id: str) -> HTMLResponse:
        record = runs.get(run_id)
        return HTMLResponse(render_run(record, runs.metrics(run_id), runs.videos(run_id)))

    return app


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


def serve_api(settings: TrainerSettings) -> None:
    """Serve the control plane with uvicorn on ``settings.api_host:api_port`` until interrupted."""
    import uvicorn

    token = first_token(settings.api_token_file)
    family = socket.AF_INET6 if ":" in settings.api_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.api_host, settings.api_port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {settings.api_host}:{settings.api_port}: {exc.strerror}") from None
    port = sock.getsockname()[1]
    app = create_app(settings, token)
    host = f"[{settings.api_host}]" if family == socket.AF_INET6 else settings.api_host
    log.info(
        "trainer control plane listening",
        url=f"http://{host}:{port}/",
        docs=f"http://{host}:{port}/docs",
        runs_dir=str(settings.runs_dir),
        registry=str(settings.registry_dir),
        auth="bearer token" if token else "none (set api_token_file to protect POST endpoints)",
    )
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    server.run(sockets=[sock])


# -- HTML ----------------------------------------------------------------------------------------------
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1f2328;background:#fff}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem}
table{border-collapse:collapse;font-size:.9rem}
td,th{padding:.3rem .6rem;border-bottom:1px solid #d0d7de;text-align:left}
.s{padding:.1rem .45rem;border-radius:.6rem;font-size:.8rem;color:#fff;background:#6e7781}
.running,.stopping{background:#0969da}
.finished{background:#1a7f37}.failed{background:#cf222e}.pending{background:#9a6700}
.plots,.videos{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0;font-size:.8rem}
.err{color:#cf222e}a{color:#0969da}code{background:#f6f8fa;padding:.1rem .3rem}
"""


def _page(title: str, body: str, refresh: bool) -> str:
    meta = '<meta http-equiv="refresh" content="10">' if refresh else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{body}"
        '<p><a href="/">runs</a> · <a href="/docs">API docs</a> · <a href="/metrics">metrics</a></p></body></html>'
    )


def _status(status: str) -> str:
    return f'<span class="s {html.escape(status)}">{html.escape(status)}</span>'


def render_index(records: Sequence[RunRecord], registries: Sequence[Registry]) -> str:
    """The dashboard's front page: a runs table and each registry's aliases."""
    rows = []
    for r in records:
        rid = html.escape(r.run_id)
        progress = f"{r.iteration}/{r.iterations}" if r.iterations is not None else str(r.iteration)
        error = f'<span class="err">{html.escape(r.error)}</span>' if r.error else ""
        rows.append(
            f'<tr><td><a href="/runs/{rid}/view">{rid}</a></td><td>{_status(r.status)}</td><td>{progress}</td>'
            f"<td>{'' if r.policy_version is None else r.policy_version}</td><td>{html.escape(r.created_at)}</td>"
            f"<td>{html.escape(r.updated_at)}</td><td>{error}</td></tr>"
        )
    table = (
        "<table><tr><th>run</th><th>status</th><th>iteration</th><th>policy version</th><th>created</th>"
        f"<th>updated</th><th>error</th></tr>{''.join(rows)}</table>"
        if rows
        else "<p>No runs yet: <code>POST /runs</code> with a run config.</p>"
    )
    versions = []
    for reg in registries:
        aliases = ", ".join(f"{html.escape(a)} → {v}" for a, v in sorted(reg.aliases().items())) or "none"
        versions.append(f"<tr><td>{reg.kind}</td><td>{len(reg.list())}</td><td>{aliases}</td></tr>")
    body = (
        "<h1>WMPO training runs</h1>"
        + table
        + "<h2>Versions</h2><table><tr><th>kind</th><th>versions</th><th>aliases</th></tr>"
        + "".join(versions)
        + "</table>"
    )
    return _page("WMPO runs", body, refresh=any(r.status in ACTIVE for r in records))


def render_run(record: RunRecord, history: Sequence[dict[str, Any]], videos: Sequence[str]) -> str:
    """One run's page: its status, an SVG plot per numeric metric, and its newest GIFs."""
    rid = html.escape(record.run_id)
    series = numeric_series(history)
    names = [n for n in PREFERRED_PLOTS if n in series] + sorted(n for n in series if n not in PREFERRED_PLOTS)
    plots = "".join(svg_plot(*series[name], title=name) for name in names[:MAX_PLOTS])
    shown = sorted(videos, reverse=True)[:MAX_VIDEOS]
    gifs = "".join(
        f'<figure><img src="/runs/{rid}/videos/{html.escape(v)}" alt="{html.escape(v)}" loading="lazy" width="192">'
        f"<figcaption>{html.escape(v)}</figcaption></figure>"
        for v in shown
    )
    progress = f"{record.iteration}/{record.iterations}" if record.iterations is not None else str(record.iteration)
    version = "-" if record.policy_version is None else str(record.policy_version)
    error = f'<p class="err">{html.escape(record.error)}</p>' if record.error else ""
    body = (
        f"<h1>Run {rid} {_status(record.status)}</h1>{error}"
        f"<p>iteration {progress} · policy version {version}"
        f" · created {html.escape(record.created_at)} · updated {html.escape(record.updated_at)}</p>"
        f'<p><a href="/runs/{rid}">status (JSON)</a> · <a href="/runs/{rid}/metrics">metrics (JSON)</a>'
        f' · <a href="/runs/{rid}/log">train.log</a></p>'
        f"<h2>Metrics</h2><div class=plots>{plots or '<p>No metrics yet.</p>'}</div>"
        f"<h2>Imagined rollouts ({len(videos)} GIFs, newest {len(shown)} shown)</h2>"
        f"<div class=videos>{gifs or '<p>No videos yet.</p>'}</div>"
    )
    return _page(f"WMPO run {record.run_id}", body, refresh=record.status in ACTIVE)


def numeric_series(history: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Metric name (nested keys joined with ``.``) -> (x, y), x being each record's ``iteration`` or its index."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for index, record in enumerate(history):
        x = record.get("iteration", index)
        if not isinstance(x, int | float) or isinstance(x, bool):
            x = index
        for name, value in _flatten(record):
            if name in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                xs, ys = series.setdefault(name, ([], []))
                xs.append(float(x))
                ys.append(float(value))
    return series


def _flatten(record: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{name}."))
        else:
            items.append((name, value))
    return items
