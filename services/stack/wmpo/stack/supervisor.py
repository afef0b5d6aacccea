"""Process supervision for the local stack: detached process groups, health probes, a JSON state file,
starting services tier by tier once the previous tier is healthy, stopping them in reverse, log tails.

Every child runs in its own session (so its own process group, untouched by the terminal's Ctrl-C).
A child is identified by its pid *and* its kernel start time, so a recycled pid is never mistaken for it.
Process state is read from ``/proc`` (Linux).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wmpo.common.errors import UserError
from wmpo.common.fsutil import atomic_write_text
from wmpo.common.redis_server import ping

ProbeKind = Literal["redis", "http", "grpc"]


@dataclass(frozen=True)
class Probe:
    """How to tell that a service is healthy: Redis PING, HTTP 200 on every URL, or gRPC health SERVING."""

    kind: ProbeKind
    targets: tuple[str, ...]

    def check(self, timeout: float = 1.0) -> bool:
        """True when the service answers healthy right now."""
        if self.kind == "redis":
            host, _, port = self.targets[0].rpartition(":")
            return ping(host, int(port), timeout)
        if self.kind == "http":
            return all(http_ok(url, timeout) for url in self.targets)
        return grpc_serving(self.targets[0], timeout)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "targets": list(self.targets)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Probe:
        return cls(data["kind"], tuple(data["targets"]))


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when GET `url` answers 200 (proxies in the environment are ignored: these are local ports)."""
    try:
        with _NO_PROXY.open(url, timeout=timeout) as response:
            return int(response.status) == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def grpc_serving(address: str, timeout: float = 1.0) -> bool:
    """True when the gRPC server at `address` reports SERVING through ``grpc.health.v1`` (overall status)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def port_free(host: str, port: int) -> bool:
    """True when a server could listen on host:port now (bind with SO_REUSEADDR, as servers do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# -- processes ----------------------------------------------------------------------------------------
def spawn(command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `command` detached in a new session, stdout and stderr appended to `log_path`."""
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
    """A process group started by the stack: its leader's pid (= the group id) and start time."""

    pid: int
    ticks: int | None

    def ours(self) -> bool:
        """True unless the leader's pid now belongs to another process (then nothing here is ours)."""
        now = start_ticks(self.pid)
        return now is None or self.ticks is None or now == self.ticks

    def alive(self) -> bool:
        """True while the leader or anything else in its process group runs."""
        if not self.ours():
            return False
        return is_running(self.pid, self.ticks) or bool(group_members(self.pid))


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_for(refs: Iterable[ProcessRef], check: Callable[[ProcessRef], bool], timeout: float) -> list[ProcessRef]:
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
    """Stop process groups: SIGTERM each leader (it shuts its own children down), then SIGTERM what is left
    of each group, then SIGKILL. Returns the groups that still have processes (normally none)."""
    refs = [r for r in refs if r.alive()]
    for ref in refs:
        if is_running(ref.pid, ref.ticks):
            with contextlib.suppress(ProcessLookupError):
                os.kill(ref.pid, signal.SIGTERM)
    _wait_for(refs, lambda r: is_running(r.pid, r.ticks), timeout)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        left = [r for r in refs if r.alive()]
        for ref in left:
            _signal_group(ref.pid, sig)
        refs = _wait_for(left, ProcessRef.alive, wait)
    return refs


def read_tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a text file ([] when it does not exist)."""
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


# -- the state file -----------------------------------------------------------------------------------
@dataclass
class ServiceRecord:
    """One supervised service as written to the state file; `pid` is None once it was stopped."""

    name: str
    tier: int
    command: list[str]
    ports: dict[str, int]
    address: str
    log: str
    probe: Probe
    pid: int | None = None
    ticks: int | None = None
    started_at: float | None = None
    stopped_at: float | None = None

    @property
    def ref(self) -> ProcessRef | None:
        return ProcessRef(self.pid, self.ticks) if self.pid is not None else None

    def alive(self) -> bool:
        """True while its process group has a live process."""
        ref = self.ref
        return ref is not None and ref.alive()

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["probe"] = self.probe.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceRecord:
        return cls(**{**data, "probe": Probe.from_json(data["probe"])})


@dataclass
class ServiceStatus:
    """What `wmpo stack status` shows for one service."""

    name: str
    pid: int | None
    state: Literal["healthy", "unhealthy", "exited", "stopped"]
    address: str
    ports: dict[str, int]
    uptime_s: float | None
    log: str

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def service_status(record: ServiceRecord, timeout: float = 1.0) -> ServiceStatus:
    """Probe one recorded service now."""
    state: Literal["healthy", "unhealthy", "exited", "stopped"]
    uptime = None
    if record.pid is None:
        state = "stopped"
    elif not is_running(record.pid, record.ticks):
        state = "exited"
    else:
        state = "healthy" if record.probe.check(timeout) else "unhealthy"
        uptime = time.time() - record.started_at if record.started_at else None
    return ServiceStatus(record.name, record.pid, state, record.address, record.ports, uptime, record.log)


# -- supervising a set of services ----------------------------------------------------------------------
@dataclass
class ServiceSpec:
    """A service to start: command, environment, ports, the address to show, its probe and its tier
    (tiers start in increasing order, each once the previous one is healthy; they stop in reverse)."""

    name: str
    command: list[str]
    env: dict[str, str]
    ports: dict[str, int]
    address: str
    probe: Probe
    tier: int = 0


class StackStartError(UserError):
    """A service did not become healthy; everything started was stopped. `log_tail`: its last log lines."""

    def __init__(self, message: str, service: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.service = service
        self.log_tail = log_tail


@dataclass
class StackDown:
    """What stopping did: services stopped, groups that would not die, recorded ports still taken."""

    stopped: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)
    busy_ports: list[int] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.survivors and not self.busy_ports


class Supervisor:
    """Starts services tier by tier and stops them in reverse, recording them in ``<dir>/stack.json``
    (with ``ports``, the named ports in use) and logging each to ``<dir>/logs/<name>.log``."""

    def __init__(self, state_dir: Path, progress: Callable[[str], None] | None = None, host: str = "127.0.0.1") -> None:
        self.dir = Path(state_dir)
        self.state_path = self.dir / "stack.json"
        self.logs_dir = self.dir / "logs"
        self.progress = progress or (lambda _line: None)
        self.host = host
        self.ports: dict[str, int] = {}
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def records(self) -> list[ServiceRecord]:
        """The recorded services (running or not), in start order; also loads `ports`."""
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.state_path} is unreadable ({exc}); check no stack runs, then remove it") from None
        self.ports = {k: int(v) for k, v in data.get("ports", {}).items()}
        return [ServiceRecord.from_json(r) for r in data.get("services", [])]

    def save(self, records: Sequence[ServiceRecord]) -> None:
        """Write the state file atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"host": self.host, "ports": self.ports, "services": [r.to_json() for r in records]}
        atomic_write_text(self.state_path, json.dumps(data, indent=2))

    def running(self) -> list[ServiceRecord]:
        """The recorded services whose process groups still run."""
        return [r for r in self.records() if r.alive()]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state directory's lock: one start or stop at a time."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".lock").open("w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"another `wmpo stack` command is working on {self.dir}; wait for it") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def start(self, specs: Sequence[ServiceSpec], timeout: float, stop_timeout: float) -> list[ServiceRecord]:
        """Start `specs` tier by tier, each tier once the previous is healthy (`timeout` s per tier).

        On any failure (or Ctrl-C) everything started is stopped and the error re-raised; a service
        that exits or stays unhealthy raises `StackStartError` naming it, with its log's last lines.
        """
        records: list[ServiceRecord] = []
        try:
            for tier in sorted({s.tier for s in specs}):
                self._start_tier([s for s in specs if s.tier == tier], records, timeout)
        except BaseException:
            self.stop(records, stop_timeout)
            self.save(records)
            raise
        return records

    def _start_tier(self, specs: list[ServiceSpec], records: list[ServiceRecord], timeout: float) -> None:
        started = []
        for spec in specs:
            self.progress(f"starting {spec.name} ({spec.address})")
            log = (self.logs_dir / f"{spec.name}.log").absolute()
            proc = spawn(spec.command, log, spec.env)
            self._procs[proc.pid] = proc
            record = ServiceRecord(spec.name, spec.tier, spec.command, spec.ports, spec.address, str(log),
                                   spec.probe, proc.pid, start_ticks(proc.pid), time.time())  # fmt: skip
            records.append(record)
            started.append(record)
            self.save(records)
        deadline = time.monotonic() + timeout
        while started:
            for record in list(started):
                if record.probe.check(timeout=1.0):
                    self.progress(f"{record.name} healthy ({time.time() - (record.started_at or 0):.1f} s)")
                    started.remove(record)
                elif not record.alive():
                    raise _start_error(record, "exited before it was healthy")
            if started and time.monotonic() > deadline:
                raise _start_error(started[0], f"not healthy after {timeout:.0f} s")
            if started:
                time.sleep(0.1)

    def stop(self, records: Sequence[ServiceRecord], timeout: float) -> StackDown:
        """Stop the recorded services tier by tier, last tier first; clear the pids of those stopped."""
        result = StackDown()
        for tier in sorted({r.tier for r in records}, reverse=True):
            group = [r for r in records if r.tier == tier and r.pid is not None]
            if not group:
                continue
            self.progress(f"stopping {', '.join(r.name for r in group)}")
            left = terminate([r.ref for r in group if r.ref is not None], timeout)
            for record in group:
                proc = self._procs.pop(record.pid or 0, None)
                if proc is not None:
                    proc.poll()  # started by this process: collect its exit status
                if record.ref in left:
                    result.survivors.append(record.name)
                    continue
                result.stopped.append(record.name)
                record.pid = record.ticks = record.started_at = None
                record.stopped_at = time.time()
        return result

    def busy_ports(self, records: Sequence[ServiceRecord], timeout: float = 5.0) -> list[int]:
        """The recorded ports that are still taken after up to `timeout` seconds (normally none)."""
        busy = sorted({p for r in records for p in r.ports.values()})
        deadline = time.monotonic() + timeout
        while True:
            busy = [p for p in busy if not port_free(self.host, p)]
            if not busy or time.monotonic() > deadline:
                return busy
            time.sleep(0.1)


def _start_error(record: ServiceRecord, why: str) -> StackStartError:
    tail = read_tail(Path(record.log), 20)
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    hint = f": {last[:300]}" if last else ""
    return StackStartError(f"{record.name} {why}{hint} (log: {record.log})", record.name, tail)
