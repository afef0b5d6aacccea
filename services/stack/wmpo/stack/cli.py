"""The local stack: Redis, Triton (`dream`/`reward`), the policy server, rollout workers and the trainer API
as local processes, started in dependency order, each only once what it needs is healthy.

A stack lives in a state directory: ``stack.json`` (what runs: commands, pids, ports, logs) and
``logs/<service>.log``; Redis keeps its append-only file in ``redis/``. `Stack` is the Python API
(`up`/`down`/`status`, addresses, a context manager); `app` is ``wmpo stack up|down|status|logs``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, ClassVar

import typer
import yaml
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from wmpo.common.cli import check_device
from wmpo.common.config import ServiceSettings
from wmpo.common.errors import UserError
from wmpo.common.net import free_port, port_free
from wmpo.common.process import read_tail
from wmpo.stack.supervisor import (
    Probe,
    ServiceRecord,
    ServiceSpec,
    ServiceStatus,
    StackDown,
    StackStartError,
    Supervisor,
    service_status,
)

SERVICES = ("redis", "dream", "policy", "worker", "api")
"""Every service of a full stack, in start order (``worker`` stands for all rollout workers)."""
_TIERS = {"redis": 0, "dream": 1, "policy": 1, "worker": 2, "api": 3}
_NEEDS = {"worker": ("redis", "dream", "policy"), "api": ("redis",)}
_ALIASES = {"workers": "worker", "triton": "dream", "trainer-api": "api"}


class StackSettings(ServiceSettings):
    """Where the stack keeps its state, its ports (0 = a free port picked at `up`) and what it serves."""

    model_config = SettingsConfigDict(env_prefix="WMPO_STACK_")
    section: ClassVar[str] = "stack"

    dir: Path = Field(default=Path("wmpo-data/stack"), description="State dir: stack.json, logs/, redis/.")
    host: str = Field(default="127.0.0.1", description="Address every service listens on.")
    redis_port: int = Field(default=6379, ge=0, le=65535, description="Redis port.")
    triton_grpc_port: int = Field(default=8001, ge=0, le=65535, description="Triton gRPC port (dream, reward).")
    triton_http_port: int = Field(default=8000, ge=0, le=65535, description="Triton HTTP port (health, models).")
    triton_metrics_port: int = Field(default=8002, ge=0, le=65535, description="Triton Prometheus port.")
    policy_port: int = Field(default=50051, ge=0, le=65535, description="Policy gRPC port.")
    policy_metrics_port: int = Field(default=9101, ge=0, le=65535, description="Policy Prometheus port.")
    worker_metrics_port: int = Field(
        default=9110, ge=0, le=65535, description="Metrics port of worker 0; worker i uses this + i."
    )
    api_port: int = Field(default=8080, ge=0, le=65535, description="Trainer API (control plane) port.")
    workers: int = Field(default=1, ge=0, description="Rollout workers to run.")
    worker_concurrency: int = Field(default=4, ge=1, description="Episodes each worker runs at once.")
    registry_dir: Path = Field(default=Path("wmpo-data/registry"), description="Policy/world-model registry.")
    runs_dir: Path = Field(default=Path("wmpo-data/runs"), description="Runs directory of the trainer API.")
    worldmodel_checkpoint: Path | None = Field(
        default=None, description="Serve this world model; unset = the registry's latest, hot-swapped."
    )
    reward_checkpoint: Path | None = Field(
        default=None, description="Reward model to serve; unset = the registry's latest `reward` version."
    )
    policy_checkpoint: Path | None = Field(
        default=None, description="Serve this policy; unset = the registry's policy versions."
    )
    policy_version: str = Field(default="latest", description="Policy alias or version to follow (registry).")
    device: str = Field(default="cpu", description="Torch device of the dream and policy servers.")
    api_token_file: Path | None = Field(default=None, description="Token the trainer API requires for writes.")
    start_timeout_s: float = Field(default=180.0, gt=0, description="Longest wait for one service to be healthy.")
    stop_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for a service to exit on SIGTERM.")


def parse_services(text: str | Sequence[str] | None) -> list[str]:
    """``"redis,dream,policy"`` (or a list) -> service names in start order; all when empty."""
    if text is None:
        return list(SERVICES)
    items = text.split(",") if isinstance(text, str) else list(text)
    names = {_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in items if n.strip()}
    unknown = sorted(names - set(SERVICES))
    if unknown:
        raise UserError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    if not names:
        raise UserError(f"--services is empty; known: {', '.join(SERVICES)}")
    for name, needs in _NEEDS.items():
        missing = [n for n in needs if name in names and n not in names]
        if missing:
            raise UserError(f"{name} needs {', '.join(missing)}: add it to --services")
    return [n for n in SERVICES if n in names]


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
    def _port(self, name: str) -> int:
        if not self.supervisor.ports:
            self.records()
        return self.supervisor.ports.get(name) or int(getattr(self.settings, name))

    @property
    def redis_url(self) -> str:
        return f"redis://{self.settings.host}:{self._port('redis_port')}/0"

    @property
    def policy_address(self) -> str:
        return f"grpc://{self.settings.host}:{self._port('policy_port')}"

    @property
    def dream_address(self) -> str:
        """Triton's gRPC address (``host:port``) serving `dream` and `reward`."""
        return f"{self.settings.host}:{self._port('triton_grpc_port')}"

    @property
    def triton_http_url(self) -> str:
        return f"http://{self.settings.host}:{self._port('triton_http_port')}"

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.host}:{self._port('api_port')}"

    def trainer_overrides(self) -> dict[str, Any]:
        """`TrainerSettings` values that point a learner at this stack: ``TrainerSettings.load(cfg, **these)``."""
        s = self.settings
        addresses = {"redis_url": self.redis_url, "policy_address": self.policy_address}
        return addresses | {"dream_address": self.dream_address, "registry_dir": s.registry_dir, "runs_dir": s.runs_dir}

    # -- up ------------------------------------------------------------------------------------------
    def up(self, services: str | Sequence[str] | None = None, *, workers: int | None = None) -> list[ServiceStatus]:
        """Start `services` (default: the constructor's, else all) in order, each once its needs are healthy.

        Returns the status of every service started.
        Raises `UserError` when a stack already runs here or a port is taken, and `StackStartError`
        (after stopping everything it started) when a service does not become healthy in time.
        """
        names = parse_services(self.services if services is None else services)
        s = self.settings
        with self.supervisor.locked():
            self._refuse_running()
            count = s.workers if workers is None else workers
            self.supervisor.ports = self._resolve_ports(names, count)
            specs = self._plan(names, count)
            records = self.supervisor.start(specs, s.start_timeout_s, s.stop_timeout_s)
        return [service_status(r) for r in records]

    def _refuse_running(self) -> None:
        alive = self.running()
        if alive:
            where = "" if self.dir == Path("wmpo-data/stack") else f" --dir {self.dir}"
            listed = ", ".join(f"{r.name} pid {r.pid}" for r in alive)
            raise UserError(f"a stack is already running in {self.dir} ({listed}); run `wmpo stack down{where}`")

    def _resolve_ports(self, names: list[str], workers: int) -> dict[str, int]:
        """Every port the services will use (0 -> a free one); refuses ports in use or given twice."""
        s = self.settings
        wanted = {"redis": ["redis_port"], "dream": ["triton_grpc_port", "triton_http_port", "triton_metrics_port"],
                  "policy": ["policy_port", "policy_metrics_port"], "api": ["api_port"]}  # fmt: skip
        ports: dict[str, int] = {}
        for name in names:
            for key in wanted.get(name, []):
                ports[key] = int(getattr(s, key)) or free_port(s.host)
        for i in range(workers if "worker" in names else 0):
            ports[f"worker_{i}_metrics_port"] = (
                s.worker_metrics_port + i if s.worker_metrics_port else free_port(s.host)
            )
        seen: dict[int, str] = {}
        for key, port in ports.items():
            if port in seen:
                raise UserError(f"{key} and {seen[port]} are both port {port}; give each service its own port")
            seen[port] = key
            if not port_free(s.host, port):
                option = key.replace("_", "-") if not key.startswith("worker_") else "worker-metrics-port"
                raise UserError(f"port {port} ({key}) on {s.host} is in use; choose another with --{option}")
        return ports

    # -- down ----------------------------------------------------------------------------------------
    def down(self) -> StackDown:
        """Stop every recorded service (reverse order), check their ports are free, clear the pids."""
        with self.supervisor.locked():
            records = self.records()
            result = self.supervisor.stop(records, self.settings.stop_timeout_s)
            self.supervisor.save(records)
        result.busy_ports = self.supervisor.busy_ports(records)
        return result

    # -- status --------------------------------------------------------------------------------------
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

    # -- the plan ------------------------------------------------------------------------------------
    def _plan(self, names: list[str], workers: int) -> list[ServiceSpec]:
        """Commands, ports and probes of every service to start (checking first what can be checked)."""
        workers = workers if "worker" in names else 0
        sections = _config_sections(self.config_file)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        redis = ["--redis", self.redis_url] if "redis" in names else []
        specs = [self._redis_spec(env)] if "redis" in names else []
        if "dream" in names:
            specs.append(self._dream_spec(env, sections))
        if "policy" in names:
            specs.append(self._policy_spec(env, sections, redis))
        specs += [self._worker_spec(i, env, sections, redis) for i in range(workers)]
        if "api" in names:
            specs.append(self._api_spec(env, sections, redis))
        for spec in specs:
            spec.tier = _TIERS[spec.name.split("-")[0]]
        return specs

    def _redis_spec(self, env: dict[str, str]) -> ServiceSpec:
        from wmpo.common.redis_server import find_redis_server

        host, port = self.settings.host, self.supervisor.ports["redis_port"]
        data = self.dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [str(find_redis_server()), "--port", str(port), "--bind", host, "--dir", str(data.resolve())]
        cmd += ["--daemonize", "no", "--protected-mode", "no", "--appendonly", "yes", "--appendfsync", "everysec"]
        return ServiceSpec("redis", cmd, env, {"redis": port}, self.redis_url, Probe("redis", (f"{host}:{port}",)))

    def _policy_spec(self, env: dict[str, str], sections: set[str], redis: list[str]) -> ServiceSpec:
        s, ports = self.settings, self.supervisor.ports
        grpc, metrics = ports["policy_port"], ports["policy_metrics_port"]
        cmd = [*_wmpo(s, "policy", "serve"), *self._policy_source(), "--host", s.host, "--port", str(grpc),
               "--device", s.device, "--metrics-port", str(metrics), *redis,
               *_config_args(self.config_file, sections, "policy")]  # fmt: skip
        env = {k: v for k, v in env.items() if k not in ("WMPO_POLICY_CHECKPOINT", "WMPO_POLICY_REGISTRY")}
        address = f"{self.policy_address} (metrics {metrics})"
        return ServiceSpec("policy", cmd, env, {"grpc": grpc, "metrics": metrics}, address,
                           Probe("grpc", (f"{s.host}:{grpc}",)))  # fmt: skip

    def _worker_spec(self, i: int, env: dict[str, str], sections: set[str], redis: list[str]) -> ServiceSpec:
        s = self.settings
        metrics = self.supervisor.ports[f"worker_{i}_metrics_port"]
        cmd = [*_wmpo(s, "trainer", "worker"), *redis, "--policy", self.policy_address,
               "--dream", self.dream_address, "--concurrency", str(s.worker_concurrency),
               "--metrics-port", str(metrics), "--name", f"worker-{i}",
               *_config_args(self.config_file, sections, "trainer")]  # fmt: skip
        url = f"http://{s.host}:{metrics}/metrics"
        return ServiceSpec(f"worker-{i}", cmd, env, {"metrics": metrics}, url, Probe("http", (url,)))

    def _api_spec(self, env: dict[str, str], sections: set[str], redis: list[str]) -> ServiceSpec:
        s = self.settings
        token = ["--token-file", str(s.api_token_file)] if s.api_token_file else []
        cmd = [*_wmpo(s, "trainer", "api"), "--host", s.host, "--port", str(self.supervisor.ports["api_port"]),
               "--runs-dir", str(s.runs_dir), "--registry", str(s.registry_dir), *redis, *token,
               *_config_args(self.config_file, sections, "trainer")]  # fmt: skip
        return ServiceSpec("api", cmd, env, {"http": self.supervisor.ports["api_port"]}, self.api_url,
                           Probe("http", (f"{self.api_url}/healthz",)))  # fmt: skip

    def _dream_spec(self, env: dict[str, str], sections: set[str]) -> ServiceSpec:
        from wmpo.common.registry import Registry, VersionNotFoundError

        s, host, p = self.settings, self.settings.host, self.supervisor.ports
        if s.worldmodel_checkpoint is not None:
            if not Path(s.worldmodel_checkpoint).is_dir():
                raise UserError(f"world-model checkpoint {s.worldmodel_checkpoint} is not a directory")
            source = ["--checkpoint", str(s.worldmodel_checkpoint)]
        elif Registry(s.registry_dir, "worldmodel").list():
            source = ["--registry", str(s.registry_dir)]
        else:
            raise UserError(f"no world model in registry {s.registry_dir}: publish one with `wmpo worldmodel publish "
                            f"CKPT --registry {s.registry_dir}` or set --worldmodel-checkpoint")  # fmt: skip
        reward = s.reward_checkpoint
        if reward is None:
            try:
                reward = Path(Registry(s.registry_dir, "reward").get("latest").path)
            except VersionNotFoundError:
                raise UserError(f"no reward model: set --reward-checkpoint (registry {s.registry_dir} has no "
                                "`reward` version)") from None  # fmt: skip
        elif not Path(reward).is_dir():
            raise UserError(f"reward checkpoint {reward} is not a directory")
        ports = {"grpc": p["triton_grpc_port"], "http": p["triton_http_port"], "metrics": p["triton_metrics_port"]}
        denv = {k: v for k, v in env.items() if k != "WMPO_WORLDMODEL_CHECKPOINT"} | {
            "WMPO_WORLDMODEL_TRITON_GRPC_PORT": str(ports["grpc"]),
            "WMPO_WORLDMODEL_TRITON_HTTP_PORT": str(ports["http"]),
            "WMPO_WORLDMODEL_TRITON_METRICS_PORT": str(ports["metrics"]),
            "WMPO_WORLDMODEL_DEVICE": s.device,
            "WMPO_WORLDMODEL_HOST": host,
        }
        cmd = [*_wmpo(s, "worldmodel", "serve"), *source, "--reward", str(reward),
               *_config_args(self.config_file, sections, "worldmodel")]  # fmt: skip
        http = f"http://{host}:{ports['http']}"
        probe = Probe("http", (f"{http}/v2/health/ready", f"{http}/v2/models/dream/ready",
                               f"{http}/v2/models/reward/ready"))  # fmt: skip
        address = f"{self.dream_address} (http {ports['http']}, metrics {ports['metrics']})"
        return ServiceSpec("dream", cmd, denv, ports, address, probe)

    def _policy_source(self) -> list[str]:
        from wmpo.common.registry import Registry

        s = self.settings
        if s.policy_checkpoint is not None:
            if not Path(s.policy_checkpoint).is_dir():
                raise UserError(f"policy checkpoint {s.policy_checkpoint} is not a directory")
            return ["--checkpoint", str(s.policy_checkpoint)]
        if not Registry(s.registry_dir, "policy").list():
            raise UserError(f"no policy in registry {s.registry_dir}: publish one with `wmpo policy publish CKPT "
                            f"--registry {s.registry_dir}` or set --policy-checkpoint")  # fmt: skip
        return ["--registry", str(s.registry_dir), "--version", s.policy_version]


def _wmpo(settings: StackSettings, *args: str) -> list[str]:
    """The command line of a `wmpo` sub-command run by this interpreter."""
    logging = ["--log-level", settings.log_level] + (["--log-json"] if settings.log_json else [])
    return [sys.executable, "-m", "wmpo.common.cli", *logging, *args]


def _config_sections(config_file: Path | None) -> set[str]:
    """Top-level sections of the stack's YAML file (a child gets ``--config`` only if its section is there)."""
    if config_file is None:
        return set()
    try:
        loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()
    return {k for k, v in loaded.items() if isinstance(v, dict)} if isinstance(loaded, dict) else set()


def _config_args(config_file: Path | None, sections: set[str], section: str) -> list[str]:
    return ["--config", str(config_file)] if config_file is not None and section in sections else []


# -- the CLI: wmpo stack up|down|status|logs ----------------------------------------------------------
app = typer.Typer(help="Run the wmpo services as local processes (Redis, Triton, policy, workers, API).",
                  no_args_is_help=True)  # fmt: skip

DirOpt = Annotated[Path | None, typer.Option("--dir", help="Stack state dir (default wmpo-data/stack).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file with a `stack:` section.")]
PortOpt = Annotated[int | None, typer.Option(min=0, max=65535, help="0: a free port.")]


def _say(line: str) -> None:
    typer.echo(f"stack: {line}", err=True)


@app.command()
def up(
    dir_: DirOpt = None,
    services: Annotated[str | None, typer.Option(help="Subset to start, e.g. redis,dream,policy.")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Rollout workers (default 1).")] = None,
    foreground: Annotated[bool, typer.Option(help="Stay attached; Ctrl-C or SIGTERM stops the stack.")] = False,
    registry: Annotated[Path | None, typer.Option(help="Registry dir (world model, reward, policy).")] = None,
    runs_dir: Annotated[Path | None, typer.Option(help="Runs dir of the trainer API.")] = None,
    worldmodel_checkpoint: Annotated[Path | None, typer.Option(help="World model to serve (else registry).")] = None,
    reward_checkpoint: Annotated[Path | None, typer.Option(help="Reward model to serve (else registry).")] = None,
    policy_checkpoint: Annotated[Path | None, typer.Option(help="Policy to serve (else registry).")] = None,
    policy_version: Annotated[str | None, typer.Option(help="Policy alias or version to follow.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    host: Annotated[str | None, typer.Option(help="Address the services listen on.")] = None,
    redis_port: PortOpt = None,
    triton_grpc_port: PortOpt = None,
    triton_http_port: PortOpt = None,
    triton_metrics_port: PortOpt = None,
    policy_port: PortOpt = None,
    policy_metrics_port: PortOpt = None,
    worker_metrics_port: PortOpt = None,
    api_port: PortOpt = None,
    worker_concurrency: Annotated[int | None, typer.Option(min=1, help="Episodes per worker at once.")] = None,
    token_file: Annotated[Path | None, typer.Option(help="Token file of the trainer API.")] = None,
    timeout: Annotated[float | None, typer.Option(min=1, help="Seconds to wait for each service.")] = None,
    config_file: ConfigOpt = None,
) -> None:
    """Start the stack in order (each service once what it needs is healthy) and return when all are healthy."""
    settings = StackSettings.load(
        config_file, dir=dir_, workers=workers, registry_dir=registry, runs_dir=runs_dir,
        worldmodel_checkpoint=worldmodel_checkpoint, reward_checkpoint=reward_checkpoint,
        policy_checkpoint=policy_checkpoint, policy_version=policy_version, device=device, host=host,
        redis_port=redis_port, triton_grpc_port=triton_grpc_port, triton_http_port=triton_http_port,
        triton_metrics_port=triton_metrics_port, policy_port=policy_port, policy_metrics_port=policy_metrics_port,
        worker_metrics_port=worker_metrics_port, api_port=api_port, worker_concurrency=worker_concurrency,
        api_token_file=token_file, start_timeout_s=timeout,
    )  # fmt: skip
    check_device(settings.device)
    stack = Stack(settings, config_file=config_file, progress=_say)
    if foreground:  # SIGTERM while starting stops what was started, like Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        statuses = stack.up(services)
    except KeyboardInterrupt:
        _say("interrupted; everything started was stopped")
        raise typer.Exit(130) from None
    except StackStartError as exc:
        if exc.log_tail:
            typer.echo(f"--- last lines of {exc.service}'s log ---", err=True)
        for line in exc.log_tail:
            typer.echo(f"  {line}", err=True)
        raise
    _print_table(statuses)
    if not foreground:
        hint = "" if stack.dir == StackSettings.model_fields["dir"].default else f" --dir {stack.dir}"
        typer.echo(f"stack up in {stack.dir}; stop it with `wmpo stack down{hint}`", err=True)
        return
    _stay_attached(stack)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _stay_attached(stack: Stack) -> None:
    """Report services that exit; on Ctrl-C/SIGTERM (or once every service has exited) bring the stack down."""
    _say("running in the foreground; Ctrl-C stops it")
    reported: set[str] = set()
    try:
        while True:
            time.sleep(1.0)
            records = [r for r in stack.records() if r.pid is not None]
            for record in records:
                if record.name not in reported and not record.alive():
                    reported.add(record.name)
                    _say(f"{record.name} exited (log: {record.log})")
            if not records or all(r.name in reported for r in records):
                break
    except KeyboardInterrupt:
        pass
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # let the shutdown finish
    _finish_down(stack.down())


def _finish_down(result: StackDown) -> None:
    _say(f"stopped {', '.join(result.stopped)}" if result.stopped else "nothing was running")
    if result.survivors:
        raise UserError(f"could not stop {', '.join(result.survivors)}; see `wmpo stack status`")
    if result.busy_ports:
        raise UserError(f"port(s) {', '.join(map(str, result.busy_ports))} are still in use by other processes")


@app.command()
def down(dir_: DirOpt = None, config_file: ConfigOpt = None) -> None:
    """Stop every service (reverse order, SIGTERM then SIGKILL) and check that their ports are free."""
    stack = Stack(StackSettings.load(config_file, dir=dir_), progress=_say)
    if not stack.records():
        _say(f"no stack in {stack.dir}")
        return
    _finish_down(stack.down())


@app.command()
def status(
    dir_: DirOpt = None,
    config_file: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """One table of the stack's services: pid, health, address, uptime, log. Exit 1 unless all are healthy."""
    stack = Stack(StackSettings.load(config_file, dir=dir_))
    statuses = stack.status()
    if as_json:
        typer.echo(json.dumps([s.to_json() for s in statuses]))
    elif statuses:
        _print_table(statuses)
    else:
        _say(f"no stack in {stack.dir}")
    if not statuses or not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@app.command()
def logs(
    service: Annotated[str | None, typer.Argument(help="redis, dream, policy, worker-N (or worker), api.")] = None,
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, help="Lines to show from the end.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    dir_: DirOpt = None,
    config_file: ConfigOpt = None,
) -> None:
    """Show (and follow) the services' logs, prefixed with the service name when there are several."""
    stack = Stack(StackSettings.load(config_file, dir=dir_))
    files = _log_files(stack, service)
    prefix = len(files) > 1
    for name, path in files.items():
        for line in read_tail(path, lines):
            typer.echo(f"{name:<9}| {line}" if prefix else line)
    if follow:
        _follow(files, prefix)


def _log_files(stack: Stack, service: str | None) -> dict[str, Path]:
    known = {r.name: Path(r.log) for r in stack.records()}
    for path in sorted(stack.logs_dir.glob("*.log")):
        known.setdefault(path.stem, path)
    if service is None:
        if not known:
            raise UserError(f"no logs in {stack.dir}")
        return known
    wanted = _ALIASES.get(service, service)
    chosen = {n: p for n, p in known.items() if n == wanted or n.split("-")[0] == wanted}
    if not chosen:
        raise UserError(f"no logs for {service!r} in {stack.dir} (services: {', '.join(known) or 'none'})")
    return chosen


def _follow(files: dict[str, Path], prefix: bool) -> None:
    offsets = {n: p.stat().st_size if p.exists() else 0 for n, p in files.items()}
    partial = dict.fromkeys(files, "")
    try:
        while True:
            for name, path in files.items():
                try:
                    with path.open("rb") as fh:
                        fh.seek(offsets[name])
                        data = fh.read()
                except OSError:
                    continue
                offsets[name] += len(data)
                *complete, partial[name] = (partial[name] + data.decode("utf-8", errors="replace")).split("\n")
                for line in complete:
                    typer.echo(f"{name:<9}| {line}" if prefix else line)
            time.sleep(0.3)
    except KeyboardInterrupt:
        return


def _print_table(statuses: Sequence[ServiceStatus]) -> None:
    from rich.console import Console
    from rich.table import Table

    colors = {"healthy": "green", "unhealthy": "yellow", "exited": "red", "stopped": "dim"}
    table = Table(title_justify="left")
    for column in ("service", "pid", "state", "address", "uptime", "log"):
        table.add_column(column, overflow="fold")
    for s in statuses:
        table.add_row(s.name, str(s.pid or "-"), f"[{colors[s.state]}]{s.state}[/]", s.address,
                      _duration(s.uptime_s), s.log)  # fmt: skip
    Console(width=160).print(table)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
