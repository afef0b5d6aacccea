"""Process supervision for the local stack: health probes, a JSON state file, starting services tier by tier
once the previous tier is healthy, stopping them in reverse. Processes themselves: `wmpo.common.process`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wmpo.common.errors import UserError
from wmpo.common.fsutil import atomic_write_text, file_lock
from wmpo.common.net import port_free
from wmpo.common.process import ProcessRef, is_running, read_tail, spawn, start_ticks, terminate
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
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(self.dir / ".lock", blocking=False))
            except BlockingIOError:
                raise UserError(f"another `wmpo stack` command is working on {self.dir}; wait for it") from None
            yield

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
