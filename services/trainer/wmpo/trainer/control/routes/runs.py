"""``/runs``: create, start, list, inspect (status, metrics, log, videos) and stop training runs."""

from __future__ import annotations

from typing import Annotated, Any

import yaml
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, Field

from wmpo.common.logs import get_logger
from wmpo.trainer.control.deps import AUTH, Control, ControlPlane
from wmpo.trainer.control.runs import InvalidRunIdError, RunExistsError, RunRecord

log = get_logger(__name__)
router = APIRouter(tags=["runs"])


class RunCreate(BaseModel):
    """A new run."""

    config: str | dict[str, Any] = Field(description="The run config: YAML text or the same as a JSON object.")
    run_id: str | None = Field(default=None, description="Run id ([a-z0-9][a-z0-9._-]{0,62}); generated if absent.")
    start: bool = Field(default=True, description="Start the learner right away.")


@router.get("/runs", summary="Every run, newest first")
def list_runs(control: Control) -> list[dict[str, Any]]:
    return [r.to_json() for r in control.store.list()]


@router.post("/runs", status_code=201, dependencies=[AUTH], summary="Create (and start) a run")
def create_run(control: Control, body: RunCreate) -> dict[str, Any]:
    text = body.config if isinstance(body.config, str) else yaml.safe_dump(body.config, sort_keys=False)
    try:
        record = control.store.create(text, body.run_id)
    except InvalidRunIdError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    except RunExistsError as exc:
        raise HTTPException(409, detail=f"{exc}: choose another run_id") from None
    except ValueError as exc:
        raise HTTPException(400, detail=str(exc)) from None
    if body.start:
        record = _start(control, record.run_id)
    return record.to_json()


@router.get("/runs/{run_id}", summary="A run's status and its last metrics record")
def get_run(control: Control, run_id: str) -> dict[str, Any]:
    record = control.store.get(run_id)
    history = control.store.metrics(run_id)
    return {**record.to_json(), "last_metrics": history[-1] if history else None}


@router.get("/runs/{run_id}/metrics", summary="Every metrics record of a run, oldest first")
def get_metrics(control: Control, run_id: str) -> list[dict[str, Any]]:
    return control.store.metrics(run_id)


@router.get("/runs/{run_id}/log", response_class=PlainTextResponse, summary="The tail of train.log")
def get_log(control: Control, run_id: str, lines: Annotated[int, Query(ge=1, le=10_000)] = 200) -> str:
    path = control.store.get(run_id).log_path
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) + "\n"


@router.get("/runs/{run_id}/videos", summary="Names of a run's imagined-rollout GIFs")
def list_videos(control: Control, run_id: str) -> list[str]:
    return control.store.videos(run_id)


@router.get("/runs/{run_id}/videos/{name}", response_class=FileResponse, summary="One GIF")
def get_video(control: Control, run_id: str, name: str) -> FileResponse:
    try:
        path = control.store.video_path(run_id, name)
    except FileNotFoundError as exc:
        raise HTTPException(404, detail=f"{exc} (GET /runs/{run_id}/videos lists them)") from None
    except ValueError as exc:
        raise HTTPException(400, detail=str(exc)) from None
    return FileResponse(path, media_type="image/gif")


@router.post("/runs/{run_id}/start", dependencies=[AUTH], summary="(Re)start a run's learner")
def start_run(control: Control, run_id: str) -> dict[str, Any]:
    control.store.get(run_id)
    return _start(control, run_id).to_json()


@router.post(
    "/runs/{run_id}/stop",
    status_code=202,
    dependencies=[AUTH],
    summary="Ask the learner to stop at a safe point (SIGTERM; SIGKILL after the stop timeout)",
)
def stop_run(control: Control, run_id: str) -> dict[str, Any]:
    try:
        record = control.launcher.stop_in_background(run_id, control.stop_timeout)
    except ValueError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    return record.to_json()


def _start(control: ControlPlane, run_id: str) -> RunRecord:
    """Start the run's learner: 409 when it runs already; a learner that cannot start fails the run."""
    try:
        return control.launcher.start(run_id)
    except RunExistsError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    except OSError as exc:
        log.error("cannot start the learner", run_id=run_id, error=str(exc))
        return control.store.update(run_id, status="failed", error=f"cannot start the learner: {exc}")
