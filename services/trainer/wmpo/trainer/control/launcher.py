"""Starting and stopping a run's learner process (``wmpo train``) for the run store.

The learner runs detached in its own session (`wmpo.common.process.spawn`), its output appended to the
run's ``train.log``; it is identified by pid *and* kernel start time (`ProcessRef`), recorded in the run's
status by the store. Every check-and-change goes through `RunStore.modify` (the run's file lock), so the
API, the CLI and the learner itself can act on the same run from different processes.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from wmpo.common.logs import get_logger
from wmpo.common.process import ProcessRef, spawn, wait_for
from wmpo.trainer.control.runs import ACTIVE, RunExistsError, RunRecord, RunStore

DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "wmpo.common.cli", "train")
"""The learner: ``wmpo train``; `LearnerLauncher.start` appends ``--config <run>/config.yaml --run-id <id>``."""

log = get_logger(__name__)


class LearnerLauncher:
    """Starts and stops the learners of `store`'s runs; `command` is the learner command line (tests pass a
    small script)."""

    def __init__(self, store: RunStore, command: Sequence[str] | None = None) -> None:
        self.store = store
        self.command: tuple[str, ...] = tuple(command) if command is not None else DEFAULT_COMMAND

    def start(self, run_id: str, extra_args: Sequence[str] = ()) -> RunRecord:
        """Start the learner for the run, detached in its own session, output appended to train.log."""

        def launch(record: RunRecord) -> dict[str, Any]:
            if record.status in ACTIVE and record.pid is not None and not record.learner_gone():
                raise RunExistsError(f"run {run_id!r} is already {record.status} (pid {record.pid})")
            argv = [*self.command, "--config", str(record.config_path), "--run-id", run_id, *extra_args]
            # The learner must write into this store whatever runs_dir its config names (env beats YAML).
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "WMPO_TRAINER_RUNS_DIR": str(self.store.runs_dir.resolve())}
            child = spawn(argv, record.log_path, env)
            log.info("learner started", run_id=run_id, pid=child.pid)
            return {"status": "running", "error": None, "pid": child.pid}

        return self.store.modify(run_id, launch)

    def request_stop(self, run_id: str) -> RunRecord:
        """SIGTERM the learner (it stops at a safe point and records ``stopped``); status ``stopping``."""

        def signal_stop(record: RunRecord) -> dict[str, Any] | None:
            process = record.process
            if record.status not in ACTIVE or process is None or record.learner_gone():
                raise ValueError(f"run {run_id!r} is not running (status {record.status})")
            if record.host is not None and record.host != socket.gethostname():
                raise ValueError(f"run {run_id!r} runs on {record.host}: stop it there (SIGTERM pid {record.pid})")
            process.send_signal(signal.SIGTERM)
            return {"status": "stopping"} if record.status == "running" else None

        return self.store.modify(run_id, signal_stop)

    def stop(self, run_id: str, timeout: float = 30.0) -> RunRecord:
        """`request_stop`, wait up to `timeout` s for the learner to exit, then SIGKILL its process group."""
        process = self.request_stop(run_id).process
        assert process is not None
        return self.wait_stopped(run_id, process, timeout)

    def stop_in_background(self, run_id: str, timeout: float = 30.0) -> RunRecord:
        """`request_stop` now; a daemon thread then does what `stop` does after it (the record: ``stopping``)."""
        record = self.request_stop(run_id)
        if record.process is not None:
            threading.Thread(
                target=self.wait_stopped,
                args=(run_id, record.process, timeout),
                name=f"stop-{run_id}",
                daemon=True,
            ).start()
        return record

    def wait_stopped(self, run_id: str, process: ProcessRef, timeout: float = 30.0) -> RunRecord:
        """Wait for a stopping learner to exit (SIGKILL to its group after `timeout` s); the run ends ``stopped``."""
        if wait_for([process], ProcessRef.leader_running, timeout):
            log.warning("learner ignored SIGTERM; killing it", run_id=run_id, pid=process.pid, timeout_s=timeout)
            process.signal_group(signal.SIGKILL)
            wait_for([process], ProcessRef.leader_running, 5.0)
        return self.store.modify(
            run_id, lambda record: {"status": "stopped", "pid": None} if record.status in ACTIVE else None
        )
