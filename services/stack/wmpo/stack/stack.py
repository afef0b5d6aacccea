"""`Stack`, the Python API of a local stack in one state directory: `up` runs the service plan
(`wmpo.stack.plan`) through the `Supervisor`, `down` and `status` read ``stack.json``, and the addresses
of the running services point clients (a learner, a benchmark) at it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from wmpo.common.errors import UserError
from wmpo.stack.plan import PORTS, Addresses, StackPlan
from wmpo.stack.settings import DEFAULT_DIR, StackSettings
from wmpo.stack.supervisor import ServiceRecord, ServiceStatus, StackDown, Supervisor, service_status


class Stack:
    """The local stack in one state directory. ``with Stack(settings, services=...) as stack:`` brings it
    up (`services`, default all) and down again.

    `progress` receives one short line per step (the CLI prints them). Addresses (`redis_url`,
    `policy_address`, `dream_address`, `api_url`) use the ports of the running stack once it is up.
    """

    def __init__(
        self,
        settings: StackSettings | None = None,
        *,
        config_file: Path | None = None,
        services: str | Sequence[str] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings or StackSettings.load(config_file)
        self.services = services
        self.dir = Path(self.settings.dir)
        self.config_file = config_file
        self.supervisor = Supervisor(self.dir, progress, host=self.settings.host)
        self.logs_dir = self.supervisor.logs_dir

    def records(self) -> list[ServiceRecord]:
        """The services recorded in ``stack.json`` (running or not), in start order."""
        return self.supervisor.records()

    def running(self) -> list[ServiceRecord]:
        """The recorded services whose processes still run."""
        return self.supervisor.running()

    # -- addresses -----------------------------------------------------------------------------------
    @property
    def addresses(self) -> Addresses:
        """The running stack's addresses (the settings' ports for what was not started here)."""
        if not self.supervisor.ports:
            self.records()
        configured = {key: int(getattr(self.settings, key)) for keys in PORTS.values() for key in keys}
        return Addresses(self.settings.host, configured | {k: p for k, p in self.supervisor.ports.items() if p})

    @property
    def redis_url(self) -> str:
        return self.addresses.redis_url

    @property
    def policy_address(self) -> str:
        return self.addresses.policy_address

    @property
    def dream_address(self) -> str:
        """Triton's gRPC address (``host:port``) serving `dream` and `reward`."""
        return self.addresses.dream_address

    @property
    def api_url(self) -> str:
        return self.addresses.api_url

    def trainer_overrides(self) -> dict[str, Any]:
        """`TrainerSettings` values that point a learner at this stack: ``TrainerSettings.load(cfg, **these)``."""
        s, at = self.settings, self.addresses
        addresses = {"redis_url": at.redis_url, "policy_address": at.policy_address}
        return addresses | {"dream_address": at.dream_address, "registry_dir": s.registry_dir, "runs_dir": s.runs_dir}

    # -- up, down, status ----------------------------------------------------------------------------
    def up(self, services: str | Sequence[str] | None = None, *, workers: int | None = None) -> list[ServiceStatus]:
        """Start `services` (default: the constructor's, else all) in order, each once its needs are healthy.

        Returns the status of every service started.
        Raises `UserError` when a stack already runs here or a port is taken, and `StackStartError`
        (after stopping everything it started) when a service does not become healthy in time.
        """
        s = self.settings
        plan = StackPlan(s, self.services if services is None else services, workers=workers,
                         config_file=self.config_file)  # fmt: skip
        with self.supervisor.locked():
            self._refuse_running()
            self.supervisor.ports = plan.ports()
            specs = plan.specs(self.supervisor.ports)
            if "redis" in plan.names:
                (self.dir / "redis").mkdir(parents=True, exist_ok=True)  # its append-only file
            records = self.supervisor.start(specs, s.start_timeout_s, s.stop_timeout_s)
        return [service_status(r) for r in records]

    def _refuse_running(self) -> None:
        alive = self.running()
        if alive:
            where = "" if self.dir == DEFAULT_DIR else f" --dir {self.dir}"
            listed = ", ".join(f"{r.name} pid {r.pid}" for r in alive)
            raise UserError(f"a stack is already running in {self.dir} ({listed}); run `wmpo stack down{where}`")

    def down(self) -> StackDown:
        """Stop every recorded service (reverse order), check their ports are free, clear the pids."""
        with self.supervisor.locked():
            records = self.records()
            result = self.supervisor.stop(records, self.settings.stop_timeout_s)
            self.supervisor.save(records)
        result.busy_ports = self.supervisor.busy_ports(records)
        return result

    def status(self) -> list[ServiceStatus]:
        """The recorded services, probed now ([] when nothing was ever started here)."""
        return [service_status(r) for r in self.records()]

    def __enter__(self) -> Stack:
        self.up()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()
