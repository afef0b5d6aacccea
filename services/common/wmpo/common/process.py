"""Detached child processes: spawn with a log, tell whether one still runs, stop a process group.

Every child runs in its own session (its own process group, untouched by the terminal's Ctrl-C). A child is
identified by its pid *and* its kernel start time (`ProcessRef`), so a recycled pid is never mistaken for it.
Process state is read from ``/proc`` (Linux).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def spawn(command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `command` detached in a new session, stdout and stderr appended to `log_path` after a header line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None without such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """The kernel start time of `pid` (clock ticks since boot), or None when it does not exist."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def reap(pid: int) -> None:
    """Collect the exit status of `pid` if it is an exited child of this process (no zombie left)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def is_running(pid: int, ticks: int | None = None) -> bool:
    """True when `pid` exists, is not a zombie and (given `ticks`) is still the process started then."""
    reap(pid)
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return ticks is None or int(fields[19]) == ticks


def group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


@dataclass(frozen=True)
class ProcessRef:
    """A process group we started: its leader's pid (= the group id) and the leader's start time."""

    pid: int
    ticks: int | None

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        """The process running as `pid` now."""
        return cls(pid, start_ticks(pid))

    def ours(self) -> bool:
        """True unless the leader's pid now belongs to another process (then nothing here is ours)."""
        now = start_ticks(self.pid)
        return now is None or self.ticks is None or now == self.ticks

    def leader_running(self) -> bool:
        """True while the leader itself (not a recycled pid) runs."""
        return is_running(self.pid, self.ticks)

    def alive(self) -> bool:
        """True while the leader or anything else in its process group runs."""
        if not self.ours():
            return False
        return self.leader_running() or bool(group_members(self.pid))

    def send_signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the leader, if it is still the process we started."""
        if self.leader_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def signal_group(self, sig: signal.Signals) -> None:
        """Send `sig` to every process of the group, unless the leader's pid now names another process."""
        if self.ours():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)


def wait_for(refs: Iterable[ProcessRef], check: Callable[[ProcessRef], bool], timeout: float) -> list[ProcessRef]:
    """Wait until `check(ref)` is false for every ref; the refs for which it still holds at the deadline."""
    pending = list(refs)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [r for r in pending if check(r)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return pending


def terminate(refs: Sequence[ProcessRef], timeout: float = 20.0, grace: float = 3.0) -> list[ProcessRef]:
    """Stop process groups: SIGTERM each leader (it shuts its own children down) and wait up to `timeout`,
    then SIGTERM what is left of each group, then SIGKILL. Returns the groups that still have processes."""
    refs = [r for r in refs if r.alive()]
    for ref in refs:
        ref.send_signal(signal.SIGTERM)
    wait_for(refs, ProcessRef.leader_running, timeout)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [r for r in refs if r.alive()]
        for ref in left:
            ref.signal_group(sig)
        refs = wait_for(left, ProcessRef.alive, grace)
    return refs


def read_tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a text file such as a process log ([] when it does not exist)."""
    if lines <= 0:
        return []
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read()
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]
