"""The run store: one directory per training run, written by the learner and read by the control plane.

Layout of ``<runs_dir>/<run_id>/``::

    config.yaml      the run's YAML, verbatim
    status.json      {run_id, status, iteration, iterations, policy_version, created_at, updated_at, error, host}
    metrics.jsonl    one JSON object per iteration, appended (a torn last line is ignored)
    train.log        stdout + stderr of the learner when the control plane started it
    pid              the learner's process id while it runs
    videos/          GIFs of imagined rollouts (``it0003-g01-e02.gif``)
    tensorboard/     TensorBoard event files

``status.json`` is replaced atomically (temporary file + ``os.replace``) under a per-run file lock, so the
learner, the API and the launcher (`wmpo.trainer.control.launcher`, which starts and stops learner
processes) can all update it from their own processes; every change is a `RunStore.modify`. A run whose
status says ``running`` but whose process is gone is reported (and recorded) as ``failed``.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast, get_args

import yaml

from wmpo.common.fsutil import atomic_write_text, file_lock
from wmpo.common.logs import get_logger
from wmpo.common.process import ProcessRef, start_ticks

RunStatus = Literal["pending", "running", "stopping", "stopped", "finished", "failed"]
STATUSES: tuple[str, ...] = get_args(RunStatus)
ACTIVE: frozenset[str] = frozenset({"running", "stopping"})
"""Statuses of a run whose learner process should be alive."""
FINAL: frozenset[str] = frozenset({"stopped", "finished", "failed"})

RUN_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
VIDEO_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.gif$")
DIED_ERROR = "the learner process exited without finishing (see train.log)"

_UPDATABLE = frozenset({"status", "iteration", "iterations", "policy_version", "error", "pid"})

log = get_logger(__name__)


class RunNotFoundError(KeyError):
    """No run with that id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "run not found"


class RunExistsError(ValueError):
    """A run with that id exists already, or is already running."""


class InvalidRunIdError(ValueError):
    """A run id that does not match ``[a-z0-9][a-z0-9._-]{0,62}``."""


def utc_now() -> str:
    """The current time as ISO 8601 UTC with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def validate_run_id(run_id: str) -> str:
    """`run_id` itself when valid; `InvalidRunIdError` saying what is allowed otherwise."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise InvalidRunIdError(
            f"invalid run id {run_id!r}: use 1-63 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return run_id


def parse_run_config(config_text: str) -> dict[str, Any]:
    """The run YAML as a mapping; `ValueError` with the parser's message when it is not one."""
    try:
        loaded = yaml.safe_load(config_text)
    except yaml.YAMLError as exc:
        raise ValueError(f"the run config is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(loaded, dict):
        raise ValueError(f"the run config must be a YAML mapping (trainer:, run:), not {type(loaded).__name__}")
    return loaded


@dataclass(frozen=True)
class RunRecord:
    """A run's status as read from its directory."""

    run_id: str
    status: RunStatus
    iteration: int
    iterations: int | None
    policy_version: int | None
    created_at: str
    updated_at: str
    error: str | None
    path: Path
    pid: int | None
    host: str | None = None
    """The machine (hostname) the learner process runs on; its pid is only checked there."""
    pid_ticks: int | None = None
    """The learner's kernel start time, so a recycled pid is not mistaken for it."""

    @property
    def process(self) -> ProcessRef | None:
        """The learner process (None when the run has none)."""
        return ProcessRef(self.pid, self.pid_ticks) if self.pid is not None else None

    def learner_gone(self) -> bool:
        """True when the run is marked active but its learner process, on this machine, no longer exists."""
        if self.status not in ACTIVE or self.pid is None:
            return False
        if self.host is not None and self.host != socket.gethostname():
            return False  # another machine's pid: cannot tell from here
        return not ProcessRef(self.pid, self.pid_ticks).leader_running()

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    @property
    def videos_dir(self) -> Path:
        return self.path / "videos"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


class RunStore:
    """Runs under `runs_dir`: their files, status and metrics (starting and stopping learners: `LearnerLauncher`)."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)

    # -- paths ---------------------------------------------------------------------------------------
    def path(self, run_id: str) -> Path:
        """The directory of `run_id` (validated; it need not exist)."""
        return self.runs_dir / validate_run_id(run_id)

    def _existing(self, run_id: str) -> Path:
        path = self.path(run_id)
        if not (path / "status.json").is_file():
            raise RunNotFoundError(f"run {run_id!r} does not exist")
        return path

    # -- creating ------------------------------------------------------------------------------------
    def create(self, config_text: str, run_id: str | None = None) -> RunRecord:
        """A new pending run holding `config_text` as its config.yaml; `RunExistsError` if the id is taken."""
        config = parse_run_config(config_text)
        if run_id is None:
            run_id = f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        path = self.path(run_id)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise RunExistsError(f"run {run_id!r} exists already") from None
        (path / "videos").mkdir()
        (path / "tensorboard").mkdir()
        (path / "config.yaml").write_text(config_text, encoding="utf-8")
        run_section = config.get("run")
        planned = run_section.get("iterations") if isinstance(run_section, dict) else None
        now = utc_now()
        status = {
            "run_id": run_id,
            "status": "pending",
            "iteration": 0,
            "iterations": planned if isinstance(planned, int) and not isinstance(planned, bool) else None,
            "policy_version": None,
            "created_at": now,
            "updated_at": now,
            "error": None,
            "host": None,
        }
        _atomic_write_json(path / "status.json", status)
        return self.get(run_id)

    def ensure(self, run_id: str, config_text: str) -> RunRecord:
        """`run_id`'s record, creating the run from `config_text` when it does not exist yet (resume)."""
        try:
            return self.get(run_id)
        except RunNotFoundError:
            pass
        try:
            return self.create(config_text, run_id)
        except RunExistsError:  # created meanwhile by someone else
            return self.get(run_id)

    # -- reading -------------------------------------------------------------------------------------
    def list(self) -> list[RunRecord]:
        """Every run, newest first."""
        if not self.runs_dir.is_dir():
            return []
        records = []
        for child in self.runs_dir.iterdir():
            if RUN_ID_PATTERN.fullmatch(child.name) and (child / "status.json").is_file():
                with contextlib.suppress(RunNotFoundError, ValueError, OSError):
                    records.append(self.get(child.name))
        return sorted(records, key=lambda r: (r.created_at, r.run_id), reverse=True)

    def get(self, run_id: str) -> RunRecord:
        """The run's record; a run marked active whose learner process is gone is recorded as failed/stopped."""
        record = self._read(self._existing(run_id))
        if record.learner_gone():
            # Under the lock, from a fresh read: the learner may have written its final status as it exited.
            record = self.modify(run_id, _record_learner_gone)
        return record

    def metrics(self, run_id: str) -> builtins.list[dict[str, Any]]:
        """Every metrics record, oldest first (a torn or corrupt line is skipped)."""
        path = self._existing(run_id) / "metrics.jsonl"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping an unreadable metrics line", run_id=run_id, line=number)
                continue
            if isinstance(value, dict):
                records.append(_finite(value))
        return records

    def videos(self, run_id: str) -> builtins.list[str]:
        """Names of the run's GIFs (files inside ``videos/``), sorted."""
        videos = (self._existing(run_id) / "videos").resolve()
        if not videos.is_dir():
            return []
        return sorted(
            p.name
            for p in videos.iterdir()
            if VIDEO_NAME_PATTERN.fullmatch(p.name) and p.is_file() and p.resolve().parent == videos
        )

    def video_path(self, run_id: str, name: str) -> Path:
        """The file of video `name`; `ValueError` for names outside ``videos/``, `FileNotFoundError` if absent."""
        videos = (self._existing(run_id) / "videos").resolve()
        if not VIDEO_NAME_PATTERN.fullmatch(name):
            raise ValueError(f"invalid video name {name!r}: expected a .gif file name such as it0003-g01-e02.gif")
        path = (videos / name).resolve()
        if path.parent != videos:
            raise ValueError(f"video {name!r} points outside the run's videos folder")
        if not path.is_file():
            raise FileNotFoundError(f"run {run_id!r} has no video {name!r}")
        return path

    # -- writing -------------------------------------------------------------------------------------
    def update(self, run_id: str, **fields: Any) -> RunRecord:
        """Merge `fields` (status, iteration, iterations, policy_version, error, pid) into status.json.

        ``pid`` goes to the ``pid`` file (None removes it); a final status (stopped, finished, failed)
        removes it too unless a pid is given.
        """
        _check_fields(fields)
        return self.modify(run_id, lambda _record: fields)

    def modify(self, run_id: str, change: Callable[[RunRecord], Mapping[str, Any] | None]) -> RunRecord:
        """Read-modify-write under the run's file lock (safe across processes): `change` gets the current
        record and returns the fields to merge as in `update` (None: leave it as is) or raises to abort."""
        path = self._existing(run_id)
        with self._lock(path):
            record = self._read(path)
            fields = change(record)
            if fields is None:
                return record
            _check_fields(fields)
            return self._write(path, fields)

    def append_metrics(self, run_id: str, record: dict[str, Any]) -> None:
        """Append one metrics record as a JSON line (flushed and fsynced; NaN and infinities become null)."""
        line = json.dumps(_finite(record), default=_json_default, allow_nan=False) + "\n"
        path = self._existing(run_id) / "metrics.jsonl"
        with path.open("a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a torn line from a crash: start ours on a fresh line
                    line = "\n" + line
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())

    # -- internals -----------------------------------------------------------------------------------
    def _read(self, path: Path) -> RunRecord:
        data = json.loads((path / "status.json").read_text(encoding="utf-8"))
        try:
            pid: int | None = int((path / "pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            pid = None
        return RunRecord(
            run_id=str(data["run_id"]),
            status=cast(RunStatus, data["status"]),
            iteration=int(data.get("iteration") or 0),
            iterations=data.get("iterations"),
            policy_version=data.get("policy_version"),
            created_at=str(data["created_at"]),
            updated_at=str(data.get("updated_at") or data["created_at"]),
            error=data.get("error"),
            path=path,
            pid=pid,
            host=data.get("host") if pid is not None else None,
            pid_ticks=data.get("pid_ticks") if pid is not None else None,
        )

    def _write(self, path: Path, fields: Mapping[str, Any]) -> RunRecord:
        """Merge `fields` into status.json (caller holds the lock)."""
        data = json.loads((path / "status.json").read_text(encoding="utf-8"))
        changes = dict(fields)
        pid_file = path / "pid"
        if "pid" in changes:
            pid = changes.pop("pid")
            if pid is None:
                pid_file.unlink(missing_ok=True)
                changes["host"] = changes["pid_ticks"] = None
            else:
                atomic_write_text(pid_file, f"{int(pid)}\n")
                changes["host"] = socket.gethostname()
                changes["pid_ticks"] = start_ticks(int(pid))
        elif changes.get("status") in FINAL:
            pid_file.unlink(missing_ok=True)
            changes["host"] = changes["pid_ticks"] = None
        data.update(changes)
        data["updated_at"] = utc_now()
        _atomic_write_json(path / "status.json", data)
        return self._read(path)

    def _lock(self, path: Path) -> contextlib.AbstractContextManager[None]:
        return file_lock(path / ".lock")


def _check_fields(fields: Mapping[str, Any]) -> None:
    unknown = sorted(set(fields) - _UPDATABLE)
    if unknown:
        raise ValueError(f"cannot update run field(s) {', '.join(unknown)}; known: {', '.join(sorted(_UPDATABLE))}")
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"unknown run status {fields['status']!r}; known: {', '.join(STATUSES)}")


def _record_learner_gone(record: RunRecord) -> dict[str, Any] | None:
    """A `modify` change: an active run whose learner is gone becomes failed (running) or stopped (stopping)."""
    if not record.learner_gone():
        return None
    if record.status == "running":
        log.warning("learner process died", run_id=record.run_id, pid=record.pid)
        return {"status": "failed", "error": DIED_ERROR, "pid": None}
    return {"status": "stopped", "pid": None}


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _finite(value.tolist())
    return value


def _json_default(value: Any) -> Any:
    """Paths in metrics records (`_finite` has turned numpy values into plain ones already)."""
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON serialisable")


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
