"""The service plan: from `StackSettings` and the services asked for, the port of every service (0 -> a free
one) and the `ServiceSpec` of every process to start (command, environment, address, health probe, tier).
It starts nothing; `wmpo.stack.stack.Stack` runs it."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from wmpo.common.errors import UserError
from wmpo.common.net import free_port, port_free
from wmpo.stack.settings import TIERS, StackSettings, parse_services
from wmpo.stack.supervisor import Probe, ServiceSpec

PORTS = {
    "redis": ("redis_port",),
    "dream": ("triton_grpc_port", "triton_http_port", "triton_metrics_port"),
    "policy": ("policy_port", "policy_metrics_port"),
    "api": ("api_port",),
}
"""The `StackSettings` port fields of each service (worker i: ``worker_<i>_metrics_port``)."""


@dataclass(frozen=True)
class Addresses:
    """Where a stack's services answer, from its host and ports (keyed like the `StackSettings` fields)."""

    host: str
    ports: Mapping[str, int]

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.ports['redis_port']}/0"

    @property
    def policy_address(self) -> str:
        return f"grpc://{self.host}:{self.ports['policy_port']}"

    @property
    def dream_address(self) -> str:
        """Triton's gRPC address (``host:port``) serving `dream` and `reward`."""
        return f"{self.host}:{self.ports['triton_grpc_port']}"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.ports['api_port']}"


class StackPlan:
    """What `up` starts: the services asked for (default all, in start order), `workers` rollout workers
    (default the settings'), their ports (`ports`) and their specs (`specs`). `config_file` is passed on as
    ``--config`` to each child whose section it has."""

    def __init__(
        self,
        settings: StackSettings,
        services: str | Sequence[str] | None = None,
        *,
        workers: int | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.settings = settings
        self.names = parse_services(services)
        count = settings.workers if workers is None else workers
        self.workers = count if "worker" in self.names else 0
        self.config_file = config_file

    def ports(self) -> dict[str, int]:
        """Every port the services will use (0 -> a free one); refuses ports in use or given twice."""
        s = self.settings
        ports: dict[str, int] = {}
        for name in self.names:
            for key in PORTS.get(name, ()):
                ports[key] = int(getattr(s, key)) or free_port(s.host)
        for i in range(self.workers):
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

    def specs(self, ports: Mapping[str, int]) -> list[ServiceSpec]:
        """Commands, ports and probes of every service to start, given `ports` (checking first what can be
        checked: the models to serve exist)."""
        at = Addresses(self.settings.host, ports)
        sections = _config_sections(self.config_file)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        redis = ["--redis", at.redis_url] if "redis" in self.names else []
        specs = [self._redis(at, env)] if "redis" in self.names else []
        if "dream" in self.names:
            specs.append(self._dream(at, env, sections))
        if "policy" in self.names:
            specs.append(self._policy(at, env, sections, redis))
        specs += [self._worker(i, at, env, sections, redis) for i in range(self.workers)]
        if "api" in self.names:
            specs.append(self._api(at, env, sections, redis))
        for spec in specs:
            spec.tier = TIERS[spec.name.split("-")[0]]
        return specs

    # -- one spec per service ------------------------------------------------------------------------
    def _redis(self, at: Addresses, env: dict[str, str]) -> ServiceSpec:
        from wmpo.common.redis_server import find_redis_server

        host, port = at.host, at.ports["redis_port"]
        data = (Path(self.settings.dir) / "redis").resolve()
        cmd = [str(find_redis_server()), "--port", str(port), "--bind", host, "--dir", str(data)]
        cmd += ["--daemonize", "no", "--protected-mode", "no", "--appendonly", "yes", "--appendfsync", "everysec"]
        return ServiceSpec("redis", cmd, env, {"redis": port}, at.redis_url, Probe("redis", (f"{host}:{port}",)))

    def _policy(self, at: Addresses, env: dict[str, str], sections: set[str], redis: list[str]) -> ServiceSpec:
        s = self.settings
        grpc, metrics = at.ports["policy_port"], at.ports["policy_metrics_port"]
        cmd = [*_wmpo(s, "policy", "serve"), *self._policy_source(), "--host", s.host, "--port", str(grpc),
               "--device", s.device, "--metrics-port", str(metrics), *redis,
               *self._config_args(sections, "policy")]  # fmt: skip
        env = {k: v for k, v in env.items() if k not in ("WMPO_POLICY_CHECKPOINT", "WMPO_POLICY_REGISTRY")}
        address = f"{at.policy_address} (metrics {metrics})"
        return ServiceSpec("policy", cmd, env, {"grpc": grpc, "metrics": metrics}, address,
                           Probe("grpc", (f"{s.host}:{grpc}",)))  # fmt: skip

    def _worker(self, i: int, at: Addresses, env: dict[str, str], sections: set[str], redis: list[str]) -> ServiceSpec:
        s = self.settings
        metrics = at.ports[f"worker_{i}_metrics_port"]
        dream = ["--dream", at.dream_address] if "dream" in self.names else []
        cmd = [*_wmpo(s, "trainer", "worker"), *redis, "--policy", at.policy_address,
               *dream, "--concurrency", str(s.worker_concurrency),
               "--metrics-port", str(metrics), "--name", f"worker-{i}",
               *self._config_args(sections, "trainer")]  # fmt: skip
        url = f"http://{s.host}:{metrics}/metrics"
        return ServiceSpec(f"worker-{i}", cmd, env, {"metrics": metrics}, url, Probe("http", (url,)))

    def _api(self, at: Addresses, env: dict[str, str], sections: set[str], redis: list[str]) -> ServiceSpec:
        s = self.settings
        token = ["--token-file", str(s.api_token_file)] if s.api_token_file else []
        cmd = [*_wmpo(s, "trainer", "api"), "--host", s.host, "--port", str(at.ports["api_port"]),
               "--runs-dir", str(s.runs_dir), "--registry", str(s.registry_dir), *redis, *token,
               *self._config_args(sections, "trainer")]  # fmt: skip
        return ServiceSpec("api", cmd, env, {"http": at.ports["api_port"]}, at.api_url,
                           Probe("http", (f"{at.api_url}/healthz",)))  # fmt: skip

    def _dream(self, at: Addresses, env: dict[str, str], sections: set[str]) -> ServiceSpec:
        from wmpo.common.registry import Registry, VersionNotFoundError

        s, host, p = self.settings, self.settings.host, at.ports
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
               *self._config_args(sections, "worldmodel")]  # fmt: skip
        http = f"http://{host}:{ports['http']}"
        probe = Probe("http", (f"{http}/v2/health/ready", f"{http}/v2/models/dream/ready",
                               f"{http}/v2/models/reward/ready"))  # fmt: skip
        address = f"{at.dream_address} (http {ports['http']}, metrics {ports['metrics']})"
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

    def _config_args(self, sections: set[str], section: str) -> list[str]:
        """``--config FILE`` for a child whose section the stack's YAML file has."""
        return ["--config", str(self.config_file)] if self.config_file is not None and section in sections else []


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
