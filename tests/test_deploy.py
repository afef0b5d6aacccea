"""The deployment artefacts, validated without Docker or a cluster (deploy/README.md, "Validation").

- docker-compose.yml against the compose specification (`check-jsonschema`; `docker compose config` too where a
  compose client exists), and its wiring (health checks behind `service_healthy`, volumes, configs, scaling, GPU).
- The kustomize overlays rendered with `kubectl kustomize`; every object validated offline against the Kubernetes
  schemas (built-in kinds, strictly) or deploy/k8s/schemas (KEDA), then its references inside the rendering.
- Cross-checks against the code: every `wmpo ...` command (compose, Kubernetes, bootstrap.sh, deploy/README.md)
  parses with the real CLI; every WMPO_* variable is a settings field (or read by the code) with a valid value;
  every port is one the command listens on; every address names a service and port that exist; every image is
  one `make images` builds from a Dockerfile target, with a non-root user.
- Each validator rejects a deliberately broken copy.
"""

from __future__ import annotations

import base64
import http.server
import importlib.util
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import typer
import yaml
from referencing import Registry, Resource

from wmpo.common.cli import build_app
from wmpo.common.config import ServiceSettings
from wmpo.common.errors import UserError
from wmpo.common.grpc_server import GrpcServer
from wmpo.common.net import free_port
from wmpo.sim.tasks import TASKS
from wmpo.trainer.rollout.queue import JobQueue
from wmpo.trainer.runconfig import RunConfig
from wmpo.trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
BOOTSTRAP = DEPLOY / "bootstrap.sh"
RUN_CONFIG = K8S / "base" / "run.yaml"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "wmpo"
# Kubernetes versions every built-in object must validate against: the oldest supported, and the newest known.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# The `run:` keys the demo run config keeps to (RunConfig has many more; the demo's sizes live in one place).
RUN_KEYS = {"task", "dataset", "iterations", "groups_per_iteration", "group_size"}
# The ports each command listens on: (flag, settings field); the value comes from the flag, else the env var,
# else the field's default. 0 means off.
LISTENS: dict[tuple[str, ...], tuple[tuple[str | None, str], ...]] = {
    ("policy", "serve"): (("--port", "port"), ("--metrics-port", "metrics_port")),
    ("worldmodel", "serve"): ((None, "triton_http_port"), (None, "triton_grpc_port"), (None, "triton_metrics_port")),
    ("worldmodel", "imagination"): (("--port", "imagination_port"),),
    ("trainer", "worker"): (("--metrics-port", "metrics_port"),),
    ("trainer", "api"): (("--port", "api_port"),),
}
REDIS_PORT = 6379
ADDRESS_FLAGS = ("--policy", "--dream", "--redis", "--triton")
# The settings sections a command group reads (the group's own name otherwise); the first one has its ports.
SECTIONS_OF_GROUP = {"train": ("trainer", "run"), "reward": ("worldmodel",), "wmpo-bootstrap": ("trainer",)}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
IMAGE_USER = 10001


# ---------------------------------------------------------------------------------------------------- the code


@cache
def settings_classes() -> dict[str, type[ServiceSettings]]:
    """Every settings class in the services (policy, worldmodel, trainer, run, ...), by section."""
    for path in sorted(ROOT.glob("services/*/wmpo/*/*.py")):
        if "(ServiceSettings)" in path.read_text(encoding="utf-8"):
            __import__(f"wmpo.{path.parent.name}.{path.stem}")
    found: dict[str, type[ServiceSettings]] = {}
    todo = list(ServiceSettings.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("wmpo.") and cls.section != "common":
            found[cls.section] = cls
    return found


@cache
def settings_env() -> dict[str, tuple[type[ServiceSettings], str]]:
    """WMPO_<SECTION>_<FIELD> -> (settings class, field) for every settings field."""
    return {f"{cls.env_prefix()}{name}".upper(): (cls, name) for cls in settings_classes().values() for name in
            cls.model_fields}  # fmt: skip


# typer ships its own copy of click; its classes are reached through typer's public names.
CLI_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


@cache
def root_command() -> Any:
    """The real `wmpo` CLI (typer's click group), every service's sub-commands attached."""
    return typer.main.get_command(build_app())


def is_group(command: Any) -> bool:
    return hasattr(command, "commands")


def base_parse_args(command: Any, ctx: Any, args: list[str]) -> list[str]:
    """Parse only a group's own options (click's Command.parse_args), returning the rest."""
    base: Any = next(c for c in type(command).__mro__ if c.__name__ == "Command")
    rest: list[str] = base.parse_args(command, ctx, args)
    return rest


@cache
def cli_envvars() -> frozenset[str]:
    """Environment variables the CLI's options read (e.g. WMPO_LOG_LEVEL)."""
    names: set[str] = set()

    def walk(command: Any) -> None:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else list(envvar or ()))
        if is_group(command):
            for sub in command.commands.values():
                walk(sub)

    walk(root_command())
    return frozenset(n for n in names if n.startswith("WMPO_"))


@cache
def code_envvars() -> frozenset[str]:
    """WMPO_* variables the services' code reads directly (os.environ / os.getenv)."""
    pattern = re.compile(r"""(?:environ(?:\.get)?\s*[\[(]|getenv\s*\()\s*["'](WMPO_[A-Z0-9_]+)["']""")
    return frozenset(m for p in ROOT.glob("services/**/*.py") for m in pattern.findall(p.read_text(encoding="utf-8")))


def sections_of(path: tuple[str, ...]) -> tuple[str, ...]:
    return SECTIONS_OF_GROUP.get(path[0], (path[0],)) if path else ()


@dataclass(frozen=True)
class Parsed:
    """A `wmpo ...` command line as the CLI parses it: the command's path, and what is wrong with it."""

    path: tuple[str, ...]
    problem: str | None = None


def parse_wmpo(argv: list[str]) -> Parsed:
    """Parse `wmpo ARGV...` with the real CLI (options, types, required ones), running nothing."""
    return _parse_wmpo(tuple(argv))


@cache
def _parse_wmpo(argv: tuple[str, ...]) -> Parsed:
    command = root_command()
    parent: Any = None
    name, args = "wmpo", list(argv)
    path: tuple[str, ...] = ()
    while is_group(command):
        ctx = command.context_class(command, info_name=name, parent=parent)
        try:
            with ctx.scope(cleanup=False):
                rest = base_parse_args(command, ctx, list(args))  # this group's own options
        except CLI_ERROR as exc:
            return Parsed(path, getattr(exc, "format_message", exc.__str__)())
        if not rest:
            if command.invoke_without_command:
                return Parsed(path)
            return Parsed(path, f"`wmpo {' '.join(path)}` needs a sub-command")
        sub = command.get_command(ctx, rest[0])
        path = (*path, rest[0])
        if sub is None:
            return Parsed(path, f"no such command `wmpo {' '.join(path)}`")
        command, name, args, parent = sub, rest[0], rest[1:], ctx
    try:
        command.make_context(name, list(args), parent=parent)
    except CLI_ERROR as exc:
        return Parsed(path, getattr(exc, "format_message", exc.__str__)())
    return Parsed(path)


def _option_values(args: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            values[key] = value
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            values[arg] = args[i + 1]
    return values


# --------------------------------------------------------------------------------------- containers, both kinds


@dataclass
class Container:
    """One process the deployment starts: its command line, environment and declared ports."""

    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # literal or resolved; secrets as "secret-<key>"
    ports: set[int] = field(default_factory=set)  # declared container ports (k8s) / published + probed (compose)

    def wmpo(self) -> Parsed | None:
        """The parsed `wmpo ...` command, if this container runs one."""
        return parse_wmpo(self.argv[1:]) if self.argv[:1] == ["wmpo"] else None

    def sections(self) -> tuple[str, ...]:
        """The settings sections this container's command reads."""
        parsed = self.wmpo()
        return sections_of(parsed.path if parsed is not None else tuple(self.argv[:1]))

    def listens(self) -> set[int]:
        """The ports this container's command listens on (flags > env > settings defaults)."""
        if self.argv[:1] == ["redis-server"]:
            return {int(_option_values(self.argv).get("--port", REDIS_PORT))}
        parsed = self.wmpo()
        if parsed is None or parsed.path not in LISTENS:
            return set()
        cls = settings_classes()[sections_of(parsed.path)[0]]
        options = _option_values(self.argv)
        ports = set()
        for flag, name in LISTENS[parsed.path]:
            env_name = f"{cls.env_prefix()}{name}".upper()
            value = options.get(flag or "") or self.env.get(env_name) or cls.model_fields[name].default
            if int(value):
                ports.add(int(value))
        return ports

    def addresses(self) -> list[tuple[str, str]]:
        """(what, host:port or URL) of every service address this container is given."""
        options = _option_values(self.argv) if self.argv[:1] == ["wmpo"] else {}
        found = [(flag, options[flag]) for flag in ADDRESS_FLAGS if flag in options]
        for name, value in self.env.items():
            if name in settings_env() and settings_env()[name][1].endswith(("_url", "_address")):
                found.append((name, value))
        return found


def worker_queue(container: Container) -> tuple[str, str]:
    """(stream key, consumer group) of the job queue a `wmpo trainer worker` container consumes."""
    options = _option_values(container.argv)
    assert options.get("--config") in (None, "/config/run.yaml"), "workers read the run config at /config/run.yaml"
    config = RUN_CONFIG if "--config" in options else None  # the file mounted there
    overrides = {settings_env()[k][1]: v for k, v in container.env.items() if k.startswith("WMPO_TRAINER_")}
    settings = TrainerSettings.load(config, **overrides)
    queue = JobQueue("redis://127.0.0.1:1/0", settings.queue_name)  # connects only when used
    queue.close()
    return queue.jobs_key, queue.group


def parse_address(value: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port``, ``grpc://host:port`` or ``redis://[:pw@]host[:port]/db``."""
    parts = urllib.parse.urlsplit(value if "://" in value else f"tcp://{value}")
    if not parts.hostname:
        return None
    port = parts.port or (REDIS_PORT if parts.scheme == "redis" else None)
    return (parts.hostname, port) if port else None


def settings_problems(container: Container) -> list[str]:
    """WMPO_* variables that are no setting of this container's service, or whose value that service refuses."""
    problems = []
    sections = container.sections()
    prefixes = {cls.env_prefix(): section for section, cls in settings_classes().items()}
    mine: dict[str, dict[str, str]] = {}
    for name, value in container.env.items():
        if not name.startswith("WMPO_") or name in cli_envvars():
            continue
        if name in code_envvars() and name not in settings_env():
            owner = next((section for prefix, section in prefixes.items() if name.startswith(prefix)), None)
            if owner is not None and owner not in sections:
                problems.append(f"{container.where}: {name} is read by `{owner}` code, but this runs {sections}")
            continue
        if name not in settings_env():
            problems.append(f"{container.where}: {name} is no wmpo setting, CLI option or variable the code reads")
            continue
        cls, field_name = settings_env()[name]
        if cls.section not in sections:
            problems.append(f"{container.where}: {name} configures `{cls.section}`, but this runs {sections}")
        elif "$(" not in value:
            mine.setdefault(cls.section, {})[field_name] = value
    for section, values in mine.items():
        try:
            settings_classes()[section].load(None, **values)
        except UserError as exc:
            problems.append(f"{container.where}: {exc}")
    return problems


def command_problems(containers: list[Container]) -> list[str]:
    """What the real CLI says about every `wmpo ...` command the containers run."""
    problems = []
    for container in containers:
        parsed = container.wmpo()
        if parsed is not None and parsed.problem is not None:
            problems.append(f"{container.where}: `{shlex.join(container.argv)}`: {parsed.problem}")
    return problems


def assert_commands(containers: list[Container]) -> None:
    assert [c for c in containers if c.wmpo() is not None], "no wmpo command found"
    problems = command_problems(containers)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------- compose


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR-default}`` with VAR unset (the defaults a fresh checkout gets)."""
    return re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", value)


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def compose_containers(doc: dict[str, Any]) -> dict[str, Container]:
    """One Container per compose service (its command, environment, published and probed ports)."""
    found = {}
    for name, service in doc["services"].items():
        command = service.get("command", [])
        argv = shlex.split(command) if isinstance(command, str) else [interpolate(str(a)) for a in command]
        env = service.get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        ports = {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}
        test = " ".join(str(t) for t in service.get("healthcheck", {}).get("test", []))
        ports |= {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", test)}
        found[name] = Container(f"compose service {name}", argv, {k: interpolate(str(v)) for k, v in env.items()},
                                ports)  # fmt: skip
    return found


def compose_hosts(doc: dict[str, Any]) -> dict[str, list[str]]:
    """Network name (service name or alias) -> the services answering to it."""
    hosts: dict[str, list[str]] = {}
    for name, service in doc["services"].items():
        aliases = [name]
        for network in (service.get("networks") or {}).values():
            aliases += (network or {}).get("aliases", [])
        for alias in aliases:
            hosts.setdefault(alias, []).append(name)
    return hosts


def compose_wiring_problems(doc: dict[str, Any]) -> list[str]:
    """Dependencies, health checks, volumes, configs, ports and addresses of a compose file."""
    problems = []
    services: dict[str, Any] = doc["services"]
    containers = compose_containers(doc)
    hosts = compose_hosts(doc)
    volumes, configs = set(doc.get("volumes") or {}), doc.get("configs") or {}
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            condition = spec.get("condition") if isinstance(spec, dict) else "service_started"
            if dep not in services:
                problems.append(f"{name} depends on unknown service {dep}")
            elif condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
            elif condition == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
                problems.append(f"{name} waits for {dep} to complete, but {dep} restarts")
            if services.get(dep, {}).get("profiles") and not (isinstance(spec, dict) and spec.get("required") is False):
                problems.append(f"{name} needs {dep}, which runs only in profiles {services[dep]['profiles']}")
        for mount in service.get("volumes", []):
            source = str(mount).split(":", 1)[0]
            if not source.startswith((".", "/")) and source not in volumes:
                problems.append(f"{name} mounts undeclared volume {source}")
        for ref in service.get("configs", []):
            source = ref["source"] if isinstance(ref, dict) else ref
            if source not in configs:
                problems.append(f"{name} uses undeclared config {source}")
        container = containers[name]
        for port in sorted(container.ports - container.listens()):
            problems.append(f"{name} publishes or probes port {port}, but its command listens on "
                            f"{sorted(container.listens())}")  # fmt: skip
        for what, value in container.addresses():
            address = parse_address(value)
            if address is None:
                problems.append(f"{name}: {what} {value!r} is no host:port")
            elif address[0] not in hosts:
                problems.append(f"{name}: {what} {value!r}: no service or alias {address[0]}")
            elif not all(address[1] in containers[s].listens() for s in hosts[address[0]]):
                problems.append(f"{name}: {what} {value!r}: {hosts[address[0]]} do not listen on {address[1]}")
    for source in configs.values():
        if not (ROOT / source["file"]).is_file():
            problems.append(f"config file {source['file']} does not exist")
    return problems


def compose_schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the compose specification it ships (offline)."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def docker_compose_available() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False)
    return probe.returncode == 0


# --------------------------------------------------------------------------------------------------- kubernetes


def kubectl() -> str:
    """kubectl's path; CI must have it, elsewhere the Kubernetes checks are skipped with a reason."""
    path = shutil.which("kubectl")
    if path is None:
        message = "kubectl is not installed: the Kubernetes manifests cannot be rendered (install kubectl)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIRECTORY`: the objects it renders (AssertionError with kustomize's message)."""
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert done.returncode == 0, f"kubectl kustomize {directory} failed: {done.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def ident(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def schema_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every object against its schema: KEDA kinds against deploy/k8s/schemas, the rest strictly against
    the Kubernetes schemas of each version in K8S_VERSIONS. Unknown kinds are problems too."""
    problems = []
    for obj in objects:
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        custom = K8S / "schemas" / f"{str(obj.get('kind')).lower()}-{group.split('.')[0]}-{version}.json"
        if group and "." in group and not group.endswith("k8s.io"):
            if not custom.is_file():
                problems.append(f"{ident(obj)}: no schema for {obj.get('apiVersion')} (add one to {custom.parent})")
                continue
            for error in jsonschema.Draft202012Validator(yaml.safe_load(custom.read_text())).iter_errors(obj):
                path = ".".join(str(p) for p in error.absolute_path)
                problems.append(f"{ident(obj)}: {path}: {error.message} ({custom.name})")
            continue
        for k8s_version in K8S_VERSIONS:
            validator = k8s_validator(str(obj.get("kind")), str(obj.get("apiVersion")), k8s_version)
            if validator is None:
                problems.append(f"{ident(obj)}: Kubernetes {k8s_version} has no kind {obj.get('apiVersion')}")
                continue
            for error in validator.iter_errors(obj):
                path = ".".join(str(p) for p in error.absolute_path)
                problems.append(f"{ident(obj)}: {path}: {error.message} (Kubernetes {k8s_version})")
    return problems


@cache
def k8s_validator(kind: str, api_version: str, k8s_version: str) -> Any:
    """kubernetes-validate's strict validator for one kind (`kubernetes_validate.validate` does the same, but
    reads the schemas again for every object); None for a kind that version does not have."""
    utils = kubernetes_validate.utils
    schema_version = [v for v in utils.all_versions() if utils.major_minor(v) <= utils.major_minor(k8s_version)][-1]
    folder = f"kubernetes-json-schema/v{schema_version}-local-strict"
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = utils.schema_contents(f"{folder}/{kind.lower()}-{api}.json", k8s_version)
    except FileNotFoundError:
        return None
    definitions = utils.schema_contents(f"{folder}/_definitions.json", k8s_version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = obj["spec"]["template"].get("metadata", {}).get("labels", {})
    return labels


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels or a plain map) matches these labels."""
    wanted = (selector or {}).get("matchLabels", selector or {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


class Cluster:
    """The objects of one rendering, indexed, with the checks that need more than one object."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects
        self.by_kind: dict[str, dict[str, dict[str, Any]]] = {}
        for obj in objects:
            self.by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
        self.workloads = [o for o in objects if o["kind"] in WORKLOAD_KINDS]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.by_kind.get(kind, {}).get(name)

    def selected(self, selector: dict[str, Any] | None) -> list[dict[str, Any]]:
        return [w for w in self.workloads if selects(selector, pod_labels(w))]

    def env_of(self, container: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
        """The container's environment as the kubelet builds it (envFrom, then env in order, $(VAR) expanded),
        secrets and fields as placeholders; and the problems met (missing ConfigMaps, Secrets, keys, refs)."""
        env: dict[str, str] = {}
        problems = []
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            obj = self.get(kind, ref.get("name", ""))
            if obj is None:
                problems.append(f"envFrom: no {kind} {ref.get('name')}")
                continue
            for key, value in (obj.get("data") or {}).items():
                env[key] = str(value) if kind == "ConfigMap" else f"secret-{key}"
        for item in container.get("env", []):
            if "value" in item:
                value, undefined = expand(str(item["value"]), env)
                problems += [f"env {item['name']}: $({name}) is not defined before it" for name in undefined]
                env[item["name"]] = value
                continue
            source = item.get("valueFrom", {})
            for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if key in source:
                    ref = source[key]
                    obj = self.get(kind, ref["name"])
                    if obj is None or ref["key"] not in (obj.get("data") or {}):
                        problems.append(f"env {item['name']}: no key {ref['key']} in {kind} {ref['name']}")
                    env[item["name"]] = f"secret-{ref['key']}" if kind == "Secret" else str(
                        ((obj or {}).get("data") or {}).get(ref["key"], ""))  # fmt: skip
            if "fieldRef" in source or "resourceFieldRef" in source:
                env[item["name"]] = f"field-{item['name'].lower()}"
        return env, problems

    def containers(self, where: str) -> list[Container]:
        """Every main container of every workload, as Containers (argv with $(VAR) expanded)."""
        return [c for workload in self.workloads for c in self.containers_of(workload, where)]

    def containers_of(self, workload: dict[str, Any], where: str = "") -> list[Container]:
        found = []
        for container in pod_spec(workload).get("containers", []):
            env, _ = self.env_of(container)
            argv = [expand(str(a), env)[0] for a in [*container.get("command", []), *container.get("args", [])]]
            ports = {int(p["containerPort"]) for p in container.get("ports", [])}
            label = f"{where} {ident(workload)} container {container['name']}".strip()
            found.append(Container(label, argv, env, ports))
        return found

    def problems(self, where: str) -> list[str]:
        """References between the objects, and the rules every workload keeps."""
        out = [f"{where}: {p}" for p in self._reference_problems()]
        containers = self.containers(where)
        for container in containers:
            out += [f"{container.where}: port {p} is declared, but the command listens on {sorted(container.listens())}"
                    for p in sorted(container.ports - container.listens())]  # fmt: skip
            out += [f"{container.where}: listens on {p}, which is no declared containerPort"
                    for p in sorted(container.listens() - container.ports)]  # fmt: skip
            for what, value in container.addresses():
                out += [f"{container.where}: {what} {value!r}: {p}" for p in self._address_problems(value)]
        return out

    def _reference_problems(self) -> list[str]:
        out = []
        for w in self.workloads:
            out += [f"{ident(w)}: {p}" for p in self._workload_problems(w)]
        for svc in self.by_kind.get("Service", {}).values():
            pods = self.selected(svc["spec"].get("selector"))
            if not pods:
                out.append(f"{ident(svc)}: selects no pods")
            for port in svc["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                out += [f"{ident(svc)}: targetPort {target} is no port of {ident(p)}" for p in pods
                        if container_port(p, target) is None]  # fmt: skip
        for sts in self.by_kind.get("StatefulSet", {}).values():
            if self.get("Service", sts["spec"]["serviceName"]) is None:
                out.append(f"{ident(sts)}: serviceName {sts['spec']['serviceName']} is no Service")
        scaled: dict[str, list[str]] = {}
        for kind, ref_key in (("HorizontalPodAutoscaler", "scaleTargetRef"), ("ScaledObject", "scaleTargetRef")):
            for obj in self.by_kind.get(kind, {}).values():
                ref = obj["spec"][ref_key]
                target = self.get(ref.get("kind", "Deployment"), ref["name"])
                if target is None:
                    out.append(f"{ident(obj)}: scale target {ref['name']} does not exist")
                    continue
                scaled.setdefault(ident(target), []).append(ident(obj))
                if "replicas" in target["spec"]:
                    out.append(f"{ident(target)}: sets replicas although {ident(obj)} owns them")
        out += [f"{t}: scaled by more than one autoscaler: {s}" for t, s in scaled.items() if len(s) > 1]
        for so in self.by_kind.get("ScaledObject", {}).values():
            out += [f"{ident(so)}: {p}" for p in self._trigger_problems(so)]
        for pdb in self.by_kind.get("PodDisruptionBudget", {}).values():
            if not self.selected(pdb["spec"]["selector"]):
                out.append(f"{ident(pdb)}: selects no pods")
        for policy in self.by_kind.get("NetworkPolicy", {}).values():
            out += [f"{ident(policy)}: {p}" for p in self._network_policy_problems(policy)]
        return out

    def _workload_problems(self, w: dict[str, Any]) -> list[str]:
        out = []
        spec, labels = pod_spec(w), pod_labels(w)
        if w["kind"] != "Job" and not selects(w["spec"].get("selector"), labels):
            out.append("selector does not match the pod template's labels")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim and self.get("PersistentVolumeClaim", claim) is None:
                out.append(f"volume {v['name']}: no PersistentVolumeClaim {claim}")
            for kind, key, name_key in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
                if key in v:
                    obj = self.get(kind, v[key][name_key])
                    if obj is None:
                        out.append(f"volume {v['name']}: no {kind} {v[key][name_key]}")
                    for item in v[key].get("items", []):
                        if obj is not None and item["key"] not in (obj.get("data") or {}):
                            out.append(f"volume {v['name']}: no key {item['key']} in {kind} {v[key][name_key]}")
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        non_root = spec.get("securityContext", {}).get("runAsNonRoot") is True
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            where = f"container {c['name']}"
            env, env_problems = self.env_of(c)
            out += [f"{where}: {p}" for p in env_problems]
            for arg in [*c.get("command", []), *c.get("args", [])]:
                out += [f"{where}: $({name}) in its command line is not defined" for name in expand(str(arg), env)[1]]
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in volumes and mount["name"] not in claims:
                    out.append(f"{where}: mounts undefined volume {mount['name']}")
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(c.get("resources", {}).get(kind, {}))
                if missing:
                    out.append(f"{where}: no {kind} for {', '.join(sorted(missing))}")
            security = c.get("securityContext", {})
            if not (non_root or security.get("runAsNonRoot")) or security.get("allowPrivilegeEscalation") is not False:
                out.append(f"{where}: must run as non-root without privilege escalation")
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(probe_name, {})
                for action in ("httpGet", "tcpSocket", "grpc"):
                    if action in probe and container_port(w, probe[action]["port"], c["name"]) is None:
                        out.append(f"{where}: {probe_name} port {probe[action]['port']} is no container port")
        return out

    def _trigger_problems(self, so: dict[str, Any]) -> list[str]:
        out = []
        target = self.get(so["spec"]["scaleTargetRef"].get("kind", "Deployment"), so["spec"]["scaleTargetRef"]["name"])
        env: dict[str, str] = {}
        if target is not None:
            env = self.env_of(pod_spec(target)["containers"][0])[0]
        for trigger in so["spec"]["triggers"]:
            for key, value in trigger["metadata"].items():
                if key.endswith("FromEnv") and value not in env:
                    out.append(f"{key}: the scale target has no environment variable {value}")
            ref = trigger.get("authenticationRef")
            auth = self.get(ref.get("kind", "TriggerAuthentication"), ref["name"]) if ref else None
            if ref and auth is None:
                out.append(f"authenticationRef: no TriggerAuthentication {ref['name']}")
            for secret_ref in (auth or {}).get("spec", {}).get("secretTargetRef", []):
                secret = self.get("Secret", secret_ref["name"])
                if secret is None or secret_ref["key"] not in (secret.get("data") or {}):
                    out.append(f"{ident(auth or {})}: no key {secret_ref['key']} in Secret {secret_ref['name']}")
        return out

    def _network_policy_problems(self, policy: dict[str, Any]) -> list[str]:
        out = []
        selector = policy["spec"]["podSelector"]
        pods = self.selected(selector) if selector else self.workloads
        if not pods:
            out.append("podSelector selects no pods")
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer and not self.selected(peer["podSelector"]):
                    out.append(f"peer {peer['podSelector']} selects no pods")
            for port in rule.get("ports", []):
                if isinstance(port.get("port"), str) and not any(container_port(p, port["port"]) for p in pods):
                    out.append(f"port {port['port']} is no named port of the pods it selects")
        return out

    def _address_problems(self, value: str) -> list[str]:
        address = parse_address(value)
        if address is None:
            return ["is no host:port"]
        host, port = address[0].split(".")[0], address[1]
        svc = self.get("Service", host)
        if svc is None:
            return [f"no Service {host}"]
        matching = [p for p in svc["spec"]["ports"] if p["port"] == port]
        if not matching:
            return [f"Service {host} has no port {port}"]
        target = matching[0].get("targetPort", port)
        for workload in self.selected(svc["spec"]["selector"]):
            number = container_port(workload, target)
            if number is not None and any(number in c.listens() for c in self.containers_of(workload)):
                return []
        return [f"Service {host} port {port} reaches no process listening on it"]


def container_port(workload: dict[str, Any], port: int | str, container: str | None = None) -> int | None:
    """The number of a pod's container port given by number or name (None when the pod has no such port)."""
    for c in pod_spec(workload).get("containers", []):
        if container not in (None, c["name"]):
            continue
        for p in c.get("ports", []):
            if port in (p["containerPort"], p.get("name")):
                return int(p["containerPort"])
    return None


def expand(value: str, env: dict[str, str]) -> tuple[str, list[str]]:
    """Kubernetes' $(VAR) expansion; returns the value and the names that were not defined."""
    undefined = [name for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value) if name not in env]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value), undefined


def validate_overlay(directory: Path) -> list[str]:
    """Everything `make test` checks about one kustomize overlay: schemas, then references."""
    objects = render(directory)
    return schema_problems(objects) + Cluster(objects).problems(directory.name)


# ---------------------------------------------------------------------------------------- images and Dockerfile


@dataclass(frozen=True)
class BuiltImage:
    target: str
    torch_index: str


@cache
def made_images(variant: str = "cpu") -> dict[str, BuiltImage]:
    """image:tag -> what `make images VARIANT=...` builds it from, read from `make -n images`."""
    done = subprocess.run(["make", "-n", "images", f"VARIANT={variant}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    images = {}
    for command in done.stdout.replace("&&", "\n").splitlines():
        if re.match(r"\s*(DOCKER_BUILDKIT=1\s+)?docker build\b", command):
            words = shlex.split(command)
            opts = _option_values(words)
            assert opts.get("--file") == "deploy/Dockerfile", command
            index = opts["--build-arg"].removeprefix("TORCH_INDEX_URL=")
            images[opts["--tag"]] = BuiltImage(opts["--target"], index)
    return images


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(path: Path = DOCKERFILE) -> tuple[list[str], list[Stage]]:
    """(ARGs declared before the first FROM, stages) of a Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    global_args: list[str] = []
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            stages.append(Stage(name, words[0]))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            global_args.append(rest.split("=")[0])
    return global_args, stages


def dockerfile_arg_default(name: str) -> str:
    """The default of a Dockerfile ARG (the first declaration that has one)."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    match = re.search(rf"^ARG {name}=(\S+)$", text, re.M)
    assert match, f"{DOCKERFILE} declares no ARG {name} with a default"
    return match.group(1)


def dockerignore_includes(relative: str) -> bool:
    """Whether .dockerignore lets `relative` into the build context (last matching pattern wins)."""
    included = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        parts = relative.split("/")
        if any(re.fullmatch(regex, "/".join(parts[: i + 1])) for i in range(len(parts))):
            included = negate
    return included


# ------------------------------------------------------------------------------------------- bootstrap, README


def bootstrap_invocations(path: Path = BOOTSTRAP) -> list[list[str]]:
    """The `wmpo ...` command lines of bootstrap.sh, variables expanded with their defaults."""
    values: dict[str, str] = {}

    def sub(text: str) -> str:
        text = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", lambda m: sub(m.group(1)), text)
        return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), m.group(0)), text)

    found = []
    for line in re.sub(r"\\\n", " ", path.read_text(encoding="utf-8")).splitlines():
        assignment = re.fullmatch(r'\s*([A-Z_]+)="(.*)"\s*', line)
        if assignment:
            values[assignment.group(1)] = sub(assignment.group(2))
            continue
        words = shlex.split(sub(line), comments=True)
        if "wmpo" in words:
            found.append(words[words.index("wmpo") :])
    return found


def readme_lines() -> list[str]:
    """The shell lines of deploy/README.md's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (DEPLOY / "README.md").read_text(encoding="utf-8"), re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def wmpo_in(words: list[str]) -> list[list[str]]:
    """`wmpo ...` command lines in a shell command, including inside `sh -c '...'`."""
    found = []
    for i, word in enumerate(words):
        if word == "wmpo" and (i == 0 or words[i - 1] not in ("-n", "--namespace")):
            found.append(words[i:])
            break
        if " " in word and "wmpo" in word:
            found += wmpo_in(shlex.split(word))
    return found


# ====================================================================================================== tests


@pytest.fixture(scope="module")
def clusters() -> dict[str, Cluster]:
    return {name: Cluster(render(K8S / "overlays" / name)) for name in OVERLAYS}


# -- compose


def test_compose_file_matches_the_compose_specification() -> None:
    done = compose_schema_check(COMPOSE_FILE)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(not docker_compose_available(), reason="no `docker compose` client here; the schema test covers it")
@pytest.mark.parametrize("profile", ["", "gpu"])
def test_docker_compose_config_accepts_the_file(profile: str) -> None:
    command = ["docker", "compose", "--file", str(COMPOSE_FILE), *(["--profile", profile] if profile else [])]
    done = subprocess.run([*command, "config", "--quiet"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_compose_wiring_holds_together() -> None:
    doc = load_compose()
    assert compose_wiring_problems(doc) == []
    services = doc["services"]
    assert (
        services["redis"]["command"][1:3] == ["--appendonly", "yes"]
        and "redis-data:/data" in services["redis"]["volumes"]
    )
    # `--scale worker=N`: no fixed name, no host port.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    # The GPU profile: a world model with an NVIDIA GPU reserved, answering as `worldmodel`.
    gpu = [s for s in services.values() if "gpu" in s.get("profiles", [])]
    assert len(gpu) == 1 and "worldmodel" in gpu[0]["networks"]["default"]["aliases"]
    devices = gpu[0]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "profiles" not in services["worldmodel"] and "profiles" not in services["trainer"]
    # Out of the box: the bootstrap runs first, the trainer runs the demo run config.
    assert services["bootstrap"]["command"] == ["wmpo-bootstrap"]
    assert compose_containers(doc)["trainer"].argv[:4] == ["wmpo", "train", "--config", "/config/run.yaml"]


def test_compose_commands_parse_with_the_real_cli() -> None:
    containers = list(compose_containers(load_compose()).values())
    assert_commands(containers)


def test_compose_env_vars_are_settings_with_valid_values() -> None:
    problems = [p for c in compose_containers(load_compose()).values() for p in settings_problems(c)]
    assert problems == []


def test_compose_images_are_the_ones_make_images_builds() -> None:
    made = {**made_images("cpu"), **made_images("cuda")}
    args, stages = dockerfile_stages()
    declared_args = {rest.split("=")[0] for s in stages for kw, rest in s.instructions if kw == "ARG"} | set(args)
    for name, service in load_compose()["services"].items():
        image = interpolate(service["image"])
        if image.startswith("redis:"):
            continue
        assert image in made, f"{name}: image {image} is not built by `make images`: {sorted(made)}"
        build = service["build"]
        assert build["dockerfile"] == "deploy/Dockerfile" and build["target"] == made[image].target, name
        assert set(build.get("args", {})) <= declared_args, f"{name}: build args the Dockerfile does not declare"
        given = build.get("args", {}).get("TORCH_INDEX_URL", dockerfile_arg_default("TORCH_INDEX_URL"))
        assert given == made[image].torch_index, f"{name}: torch from {given}, `make images` uses another index"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["services"]["worker"].update(replica=2), "'replica' was unexpected"),
        (lambda d: d["services"]["trainer"]["depends_on"]["worker"].update(condition="service_ready"), "service_ready"),
        (lambda d: d["services"]["redis"]["healthcheck"].update(interval=5), "5"),
    ],
    ids=["unknown-service-key", "bad-depends-on-condition", "interval-not-a-duration"],
)
def test_compose_schema_check_rejects_a_broken_copy(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    doc = load_compose()
    edit(doc)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(doc))
    done = compose_schema_check(broken)
    assert done.returncode != 0 and expected in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["services"]["redis"].pop("healthcheck"), "redis has no healthcheck"),
        (lambda d: d["services"]["policy"]["volumes"].append("models:/models"), "undeclared volume models"),
        (lambda d: d["services"]["policy"]["ports"].append("127.0.0.1:50052:50052"), "port 50052"),
        (lambda d: d["services"]["worker"]["command"].__setitem__(8, "worldmodel:8005"), "not listen on 8005"),
        (lambda d: d["services"]["worker"]["command"].__setitem__(6, "grpc://policies:50051"), "no service or alias"),
    ],
    ids=["healthy-without-healthcheck", "undeclared-volume", "port-not-listened", "wrong-port", "unknown-host"],
)
def test_compose_wiring_check_rejects_a_broken_copy(edit: Callable[[dict[str, Any]], None], expected: str) -> None:
    doc = load_compose()
    edit(doc)
    problems = compose_wiring_problems(doc)
    assert any(expected in p for p in problems), problems


# -- kubernetes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate_against_the_kubernetes_schemas(overlay: str, clusters: dict[str, Cluster]) -> None:
    assert schema_problems(clusters[overlay].objects) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_references_hold(overlay: str, clusters: dict[str, Cluster]) -> None:
    assert clusters[overlay].problems(overlay) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_what_the_deployment_needs(overlay: str, clusters: dict[str, Cluster]) -> None:
    cluster = clusters[overlay]
    assert {o["metadata"].get("namespace", NAMESPACE) for o in cluster.objects} == {NAMESPACE}
    for name in ("worldmodel", "policy", "worker", "trainer-api"):
        assert cluster.get("Deployment", name) is not None and cluster.get("Service", name) is not None, name
    for name in ("worldmodel", "policy", "worker"):
        assert cluster.get("PodDisruptionBudget", name) is not None, name
    containers = {c["name"]: c for w in cluster.workloads for c in pod_spec(w)["containers"]}
    assert containers["worldmodel"]["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "grpc" in containers["policy"]["readinessProbe"]
    assert cluster.get("HorizontalPodAutoscaler", "policy") is not None
    # Redis: a StatefulSet with its own volume.
    assert cluster.by_kind["StatefulSet"]["redis"]["spec"]["volumeClaimTemplates"]
    # The learner: exactly one pod at a time.
    trainer = cluster.by_kind["Job"]["trainer"]["spec"]
    assert trainer.get("parallelism") == 1 and trainer.get("completions") == 1
    # Workers scale on the stream and consumer group of the job queue they consume.
    trigger = cluster.by_kind["ScaledObject"]["worker"]["spec"]["triggers"][0]
    assert trigger["type"] == "redis-streams"
    worker = next(c for c in cluster.containers(overlay) if c.where.endswith("container worker"))
    stream, group = worker_queue(worker)
    assert (trigger["metadata"]["stream"], trigger["metadata"]["consumerGroup"]) == (stream, group)
    assert {"registry", "data"} <= set(cluster.by_kind["PersistentVolumeClaim"])
    # GPUs only for the world model, only in the gpu overlay.
    gpus = {c["name"]: int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers.values()}
    assert gpus == {name: int(overlay == "gpu" and name == "worldmodel") for name in gpus}


def test_trainer_token_is_one_the_policy_accepts(clusters: dict[str, Cluster]) -> None:
    data = clusters["cpu"].by_kind["Secret"]["wmpo-secrets"]["data"]
    decoded = {k: base64.b64decode(v).decode() for k, v in data.items()}
    assert decoded["trainer-policy-token"].strip() in decoded["policy-tokens"].split()
    assert {"redis-password", "api-token"} <= set(decoded)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_workers_and_the_ingress_reach_the_services(
    overlay: str, clusters: dict[str, Cluster]
) -> None:
    cluster = clusters[overlay]
    deny = cluster.by_kind["NetworkPolicy"]["default-deny-ingress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def peers(component: str, port: str) -> list[dict[str, Any]]:
        labels = pod_labels(cluster.by_kind["Deployment"][component])
        return [peer for p in cluster.by_kind["NetworkPolicy"].values() if selects(p["spec"]["podSelector"], labels)
                for rule in p["spec"].get("ingress", []) if any(x.get("port") == port for x in rule.get("ports", []))
                for peer in rule.get("from", [])]  # fmt: skip

    def pods(component: str) -> dict[str, Any]:
        return {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "wmpo", "app.kubernetes.io/component": component}}
        }

    # Workers, and the learner (it checks that what it publishes is served); robots through the ingress.
    assert peers("worldmodel", "grpc") == [pods("worker"), pods("trainer")]
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    assert peers("policy", "grpc") == [pods("worker"), pods("trainer"), ingress]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_commands_parse_with_the_real_cli(overlay: str, clusters: dict[str, Cluster]) -> None:
    assert_commands(clusters[overlay].containers(overlay))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_env_vars_are_settings_with_valid_values(overlay: str, clusters: dict[str, Cluster]) -> None:
    assert [p for c in clusters[overlay].containers(overlay) for p in settings_problems(c)] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_images_are_the_ones_make_images_builds(overlay: str, clusters: dict[str, Cluster]) -> None:
    made = {**made_images("cpu"), **made_images("cuda")}
    for w in clusters[overlay].workloads:
        spec = pod_spec(w)
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            if c["image"].startswith("redis:"):
                continue
            assert c["image"] in made, f"{ident(w)}: image {c['image']} is not built by `make images`"
            assert spec["securityContext"]["runAsUser"] == IMAGE_USER, f"{ident(w)}: not the images' user"
    expected_tag = "dev-cuda" if overlay == "gpu" else "dev"
    assert pod_spec(clusters[overlay].by_kind["Deployment"]["worldmodel"])["containers"][0]["image"] == (
        f"wmpo-worldmodel:{expected_tag}"
    )


def test_external_redis_component_renders_and_validates(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    overlay.joinpath("kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", overlay)],
        "components": [os.path.relpath(K8S / "components" / "external-redis", overlay)],
    }))  # fmt: skip
    objects = render(overlay)
    assert schema_problems(objects) == []
    cluster = Cluster(objects)
    assert cluster.get("StatefulSet", "redis") is None and cluster.get("Service", "redis") is None
    env = next(o for n, o in cluster.by_kind["ConfigMap"].items() if n.startswith("wmpo-env"))["data"]
    assert env["REDIS_ADDRESS"] != "redis:6379"


def _delete_selector(docs: list[dict[str, Any]]) -> None:
    next(d for d in docs if d["kind"] == "Deployment")["spec"].pop("selector")


def _port_as_string(docs: list[dict[str, Any]]) -> None:
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    container["ports"][0]["containerPort"] = "50051"


def _unknown_field(docs: list[dict[str, Any]]) -> None:
    next(d for d in docs if d["kind"] == "Service")["spec"]["selectr"] = {"app": "policy"}


def _trigger_number(docs: list[dict[str, Any]]) -> None:
    next(d for d in docs if d["kind"] == "ScaledObject")["spec"]["triggers"][0]["metadata"]["lagCount"] = 16


def _no_triggers(docs: list[dict[str, Any]]) -> None:
    next(d for d in docs if d["kind"] == "ScaledObject")["spec"].pop("triggers")


def _dangling_target_port(docs: list[dict[str, Any]]) -> None:
    next(d for d in docs if d["kind"] == "Service")["spec"]["ports"][0]["targetPort"] = "grcp"


def _wrong_secret_key(docs: list[dict[str, Any]]) -> None:
    env = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    env[0]["valueFrom"]["secretKeyRef"]["key"] = "redis-pasword"


def _typo_in_option(docs: list[dict[str, Any]]) -> None:
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    args[args.index("--metrics-port")] = "--metrics-prot"


def _unknown_setting(docs: list[dict[str, Any]]) -> None:
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "WMPO_POLICY_MAX_BATCH", "value": "8"})


def _bad_setting_value(docs: list[dict[str, Any]]) -> None:
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "WMPO_POLICY_MAX_BATCH_SIZE", "value": "zero"})


def _other_service_setting(docs: list[dict[str, Any]]) -> None:
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "WMPO_WORLDMODEL_DEVICE", "value": "cpu"})


def _port_not_listened(docs: list[dict[str, Any]]) -> None:
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    args[args.index("--port") + 1] = "6000"


@pytest.mark.parametrize(
    ("file", "edit", "expected"),
    [
        ("policy.yaml", _delete_selector, "'selector' is a required property"),
        ("policy.yaml", _port_as_string, "'50051' is not of type 'integer'"),
        ("policy.yaml", _unknown_field, "Additional properties are not allowed ('selectr'"),
        ("worker.yaml", _trigger_number, "16 is not of type 'string'"),
        ("worker.yaml", _no_triggers, "'triggers' is a required property"),
        ("policy.yaml", _dangling_target_port, "targetPort grcp is no port"),
        ("policy.yaml", _wrong_secret_key, "no key redis-pasword in Secret wmpo-secrets"),
        ("policy.yaml", _typo_in_option, "No such option: --metrics-prot"),
        ("policy.yaml", _unknown_setting, "WMPO_POLICY_MAX_BATCH is no wmpo setting"),
        ("policy.yaml", _bad_setting_value, "policy.max_batch_size"),
        ("policy.yaml", _other_service_setting, "WMPO_WORLDMODEL_DEVICE configures `worldmodel`"),
        ("policy.yaml", _port_not_listened, "port 50051 is declared, but the command listens on [6000, 9100]"),
    ],
    ids=[
        "no-selector",
        "port-as-string",
        "unknown-field",
        "trigger-metadata-number",
        "no-triggers",
        "dangling-target-port",
        "wrong-secret-key",
        "typo-in-option",
        "unknown-setting",
        "bad-setting-value",
        "other-service-setting",
        "port-not-listened",
    ],
)
def test_validation_rejects_a_broken_copy_of_an_overlay(
    tmp_path: Path, file: str, edit: Callable[[list[dict[str, Any]]], None], expected: str
) -> None:
    shutil.copytree(K8S, tmp_path / "k8s")
    path = tmp_path / "k8s" / "base" / file
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    edit(docs)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    objects = render(tmp_path / "k8s" / "overlays" / "cpu")
    cluster = Cluster(objects)
    problems = schema_problems(objects)
    if not problems:  # schema-valid: the references and the cross-checks must catch it
        problems = cluster.problems("cpu") + command_problems(cluster.containers("cpu"))
        problems += [p for c in cluster.containers("cpu") for p in settings_problems(c)]
    assert any(expected in p for p in problems), "\n".join(problems)


def test_kustomize_failure_is_reported(tmp_path: Path) -> None:
    shutil.copytree(K8S, tmp_path / "k8s")
    (tmp_path / "k8s" / "base" / "worker.yaml").unlink()
    with pytest.raises(AssertionError, match=r"kubectl kustomize .* failed: .*worker\.yaml"):
        render(tmp_path / "k8s" / "overlays" / "cpu")


# -- images, the Dockerfile, the Makefile


def test_dockerfile_has_a_non_root_target_for_every_image() -> None:
    global_args, stages = dockerfile_stages()
    by_name = {s.name: s for s in stages}
    assert {"BASE_IMAGE"} <= set(global_args)
    assert any(kw == "ARG" and rest.startswith("TORCH_INDEX_URL=") for s in stages for kw, rest in s.instructions)
    for variant in ("cpu", "cuda"):
        for image, built in made_images(variant).items():
            stage = by_name.get(built.target)
            assert stage is not None, f"{image}: no stage {built.target} in {DOCKERFILE}"
            users = [rest for kw, rest in stage.instructions if kw == "USER"]
            assert users and users[-1] == f"{IMAGE_USER}:{IMAGE_USER}", f"{built.target}: must end as {IMAGE_USER}"
            assert any(kw == "COPY" and "--from=build-" in rest for kw, rest in stage.instructions), built.target
    assert made_images("cpu")["wmpo-policy:dev"].torch_index.endswith("/whl/cpu")
    assert "/whl/cu" in made_images("cuda")["wmpo-worldmodel:dev-cuda"].torch_index


def test_dockerfile_copies_only_what_the_build_context_holds() -> None:
    _, stages = dockerfile_stages()
    sources = []
    for stage in stages:
        for keyword, rest in stage.instructions:
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            if keyword == "COPY" and "--from=" not in rest:
                sources += words[:-1]
            sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", rest)
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"{DOCKERFILE} copies {source}, which does not exist"
        files = (
            [source] if (ROOT / source).is_file() else [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
        )
        assert files and all(dockerignore_includes(f) for f in files), f".dockerignore leaves out {source}"
    assert not dockerignore_includes(".venv/bin/python") and not dockerignore_includes("tests/test_deploy.py")
    assert not dockerignore_includes("services/common/wmpo/common/__pycache__/cli.cpython-311.pyc")


@pytest.mark.skipif(
    shutil.which("docker") is not None
    and subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0,
    reason="a Docker engine is running here: `make images` would build",
)
def test_make_images_explains_why_it_cannot_build_here() -> None:
    done = subprocess.run(["make", "images"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "make images: " in done.stdout and "Docker" in done.stdout


def test_make_images_refuses_an_unknown_variant() -> None:
    done = subprocess.run(["make", "images", "VARIANT=rocm"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode != 0 and "VARIANT must be cpu or cuda" in done.stdout


# -- the bootstrap, the run config, the README


def test_bootstrap_script_is_valid_shell_running_real_commands() -> None:
    subprocess.run(["sh", "-n", str(BOOTSTRAP)], check=True, timeout=30)
    invocations = bootstrap_invocations()
    paths = {parse_wmpo(argv[1:]).path for argv in invocations}
    assert {("data", "collect"), ("policy", "train-bc"), ("policy", "publish"), ("worldmodel", "train"),
            ("reward", "train"), ("worldmodel", "publish")} <= paths  # fmt: skip
    assert_commands([Container("deploy/bootstrap.sh", argv) for argv in invocations])


def test_run_config_configures_the_trainer_and_the_demo_run() -> None:
    doc = yaml.safe_load(RUN_CONFIG.read_text())
    settings, run = TrainerSettings.load(RUN_CONFIG), RunConfig.load(RUN_CONFIG)  # as `wmpo train` reads it
    assert set(doc["run"]) <= RUN_KEYS, f"run keys beyond the agreed ones: {set(doc['run']) - RUN_KEYS}"
    assert run.task in TASKS
    collect = next(a for a in bootstrap_invocations() if a[1:3] == ["data", "collect"])
    assert doc["run"]["dataset"] == collect[collect.index("--out") + 1]
    env = {f"WMPO_TRAINER_{k.upper()}": str(getattr(settings, k)) for k in ("redis_url", "policy_address",
                                                                            "dream_address")}  # fmt: skip
    doc_compose = load_compose()
    compose_problems = compose_wiring_problems(
        {**doc_compose, "services": {**doc_compose["services"], "probe": {"environment": env}}}
    )
    assert compose_problems == []
    assert settings.registry_dir == Path("/registry") and settings.runs_dir == Path("/data/runs")


def test_run_config_addresses_exist_in_the_overlays(clusters: dict[str, Cluster]) -> None:
    settings = TrainerSettings.load(RUN_CONFIG)
    for cluster in clusters.values():
        for value in (settings.redis_url, settings.policy_address, settings.dream_address):
            assert cluster._address_problems(value) == [], value


def test_readme_commands_are_the_ones_the_tests_render_and_run(clusters: dict[str, Cluster]) -> None:
    rendered = {f"deploy/k8s/overlays/{name}" for name in OVERLAYS}
    doc = load_compose()
    profiles = {p for s in doc["services"].values() for p in s.get("profiles", [])}
    objects = {(o["kind"], o["metadata"]["name"]) for c in clusters.values() for o in c.objects}
    kinds = {"deploy": "Deployment", "job": "Job", "svc": "Service", "scaledobject": "ScaledObject",
             "hpa": "HorizontalPodAutoscaler", "statefulset": "StatefulSet"}  # fmt: skip
    overlays_used, wmpo_lines = set(), []
    for line in readme_lines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["kubectl"]:
            overlays_used |= {w for w in words if w.startswith("deploy/k8s/")}
            if "-n" in words:
                assert words[words.index("-n") + 1] == NAMESPACE, line
            for kind, name in (m.groups() for w in words if (m := re.fullmatch(r"([a-z]+)/([a-z0-9-]+)", w))):
                assert (kinds[kind], name) in objects, f"README names {kind}/{name}, which is not rendered"
        elif words[:2] == ["docker", "compose"]:
            for flag, value in itertools.pairwise(words):
                assert flag != "--profile" or value in profiles, line
                assert flag != "--scale" or value.split("=")[0] in doc["services"], line
            for verb in ("exec", "logs"):
                if verb in words:
                    named = [w for w in words[words.index(verb) + 1 :] if not w.startswith("-")]
                    assert named and named[0] in doc["services"], line
        elif words[:2] == ["make", "images"]:
            for word in words[2:]:
                key, _, value = word.partition("=")
                assert key in ("VARIANT", "IMAGE_TAG") and (key != "VARIANT" or value in ("cpu", "cuda")), line
        wmpo_lines += wmpo_in(words)
    assert overlays_used == rendered, "the README's overlays are not the ones the tests render"
    assert wmpo_lines, "the README shows no wmpo command"
    assert_commands([Container("deploy/README.md", argv) for argv in wmpo_lines])


# -- the health checks the images run


def _healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wmpo_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def http_server() -> Iterator[str]:
    """A real HTTP server answering 200 on /ok and 404 elsewhere."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ok" else 404)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_healthcheck_http(http_server: str) -> None:
    check = _healthcheck()
    assert check.main(["http", f"{http_server}/ok"]) == 0
    assert check.main(["http", f"{http_server}/missing"]) == 1
    assert check.main(["http", f"http://127.0.0.1:{free_port()}/ok"]) == 1
    assert check.main(["ftp"]) == 2


def test_healthcheck_grpc() -> None:
    check = _healthcheck()
    server = GrpcServer([], port=0).start()
    try:
        assert check.main(["grpc", server.address]) == 1  # NOT_SERVING until ready
        server.set_serving(True)
        assert check.main(["grpc", server.address]) == 0
    finally:
        server.stop(grace=0.1)
    assert check.main(["grpc", server.address]) == 1


def test_healthcheck_wait(tmp_path: Path) -> None:
    check = _healthcheck()
    (tmp_path / "a").touch()
    assert check.main(["wait", str(tmp_path / "a")]) == 0
    assert check.main(["wait", "--timeout", "0.01", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
