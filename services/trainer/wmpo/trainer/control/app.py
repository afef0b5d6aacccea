"""The trainer's control plane: a FastAPI app over the run store, the learner launcher and the version registries.

Reads are open; every POST needs ``Authorization: Bearer <token>`` when a token is configured.
Errors are 4xx with a JSON ``{"detail": "..."}`` saying what to fix. ``GET /`` is a self-contained
HTML dashboard (runs, versions, per-run SVG plots and imagined-rollout GIFs); OpenAPI docs are at ``/docs``.
The routes live in `wmpo.trainer.control.routes` (health, runs, versions) and `wmpo.trainer.control.dashboard`;
what they share, in `wmpo.trainer.control.deps`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from wmpo.common import __version__
from wmpo.common.auth import first_token
from wmpo.common.errors import UserError
from wmpo.common.logs import get_logger
from wmpo.common.metrics import counter, histogram
from wmpo.common.registry import VersionNotFoundError
from wmpo.trainer.control import dashboard
from wmpo.trainer.control.deps import ControlPlane
from wmpo.trainer.control.launcher import LearnerLauncher
from wmpo.trainer.control.routes import health, runs, versions
from wmpo.trainer.control.runs import InvalidRunIdError, RunNotFoundError, RunStore
from wmpo.trainer.settings import TrainerSettings

log = get_logger(__name__)
REQUESTS = counter("trainer_api_requests", "Control-plane HTTP requests.", ["method", "route", "code"])
LATENCY = histogram("trainer_api_request_seconds", "Control-plane HTTP request latency.", ["route"])


def create_app(
    settings: TrainerSettings,
    token: str | None,
    *,
    store: RunStore | None = None,
    launcher: LearnerLauncher | None = None,
    stop_timeout: float = 30.0,
) -> FastAPI:
    """The control-plane app. `store` defaults to the launcher's store, else a `RunStore` over
    ``settings.runs_dir``; `launcher` to a `LearnerLauncher` of that store running ``wmpo train``."""
    if store is None:
        store = launcher.store if launcher is not None else RunStore(settings.runs_dir)
    if launcher is None:
        launcher = LearnerLauncher(store)
    elif launcher.store is not store:
        raise ValueError("the launcher must work on the app's run store")
    app = FastAPI(
        title="WMPO trainer control plane",
        description=(
            "Start, watch and stop WMPO training runs; list, promote and roll back policy, world-model and "
            "reward-model versions. Reads are open; POST endpoints need `Authorization: Bearer <token>` when "
            "the server has a token. The dashboard is at `/`, Prometheus metrics at `/metrics`."
        ),
        version=__version__,
    )
    app.state.control = ControlPlane(settings, token, store, launcher, stop_timeout)
    for router in (health.router, runs.router, versions.router, dashboard.router):
        app.include_router(router)
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(RunNotFoundError)(_no_run)
    app.exception_handler(InvalidRunIdError)(_bad_run_id)
    app.exception_handler(VersionNotFoundError)(_no_version)
    app.middleware("http")(_count_requests)
    return app


# -- errors and request metrics ----------------------------------------------------------------------
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [
        f"{'.'.join(str(p) for p in err.get('loc', ())) or 'request'}: {err.get('msg', 'invalid')}"
        for err in exc.errors()
    ]
    errors = [{"loc": list(err.get("loc", ())), "msg": err.get("msg"), "type": err.get("type")} for err in exc.errors()]
    return JSONResponse(
        status_code=422, content={"detail": "invalid request: " + "; ".join(problems), "errors": errors}
    )


async def _no_run(_request: Request, exc: RunNotFoundError) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": f"{exc} (GET /runs lists the runs)"})


async def _bad_run_id(_request: Request, exc: InvalidRunIdError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": str(exc)})


async def _no_version(_request: Request, exc: VersionNotFoundError) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": str(exc.args[0]) if exc.args else "no such version"})


async def _count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    start = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    REQUESTS.labels(method=request.method, route=route, code=str(response.status_code)).inc()
    LATENCY.labels(route=route).observe(time.perf_counter() - start)
    return response


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
