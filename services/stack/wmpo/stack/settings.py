"""What a local stack is made of: `StackSettings` (state dir, ports, models, devices; YAML ``stack:``, env
``WMPO_STACK_*``), the service names with their start tiers, needs and aliases, and `parse_services`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from wmpo.common.config import ServiceSettings
from wmpo.common.errors import UserError

SERVICES = ("redis", "dream", "policy", "worker", "api")
"""Every service of a full stack, in start order (``worker`` stands for all rollout workers)."""
TIERS = {"redis": 0, "dream": 1, "policy": 1, "worker": 2, "api": 3}
"""Start tier of each service: a tier starts once every service of the tiers before it is healthy."""
NEEDS = {"worker": ("redis", "policy"), "api": ("redis",)}
"""What each service cannot run without (workers need `dream` only for dream runs: sim runs use the simulator)."""
"""Services that cannot start without others in the same stack."""
ALIASES = {"workers": "worker", "triton": "dream", "trainer-api": "api"}
"""Other names accepted for a service (``--services``, ``wmpo stack logs``)."""
DEFAULT_DIR = Path("wmpo-data/stack")


class StackSettings(ServiceSettings):
    """Where the stack keeps its state, its ports (0 = a free port picked at `up`) and what it serves."""

    model_config = SettingsConfigDict(env_prefix="WMPO_STACK_")
    section: ClassVar[str] = "stack"

    dir: Path = Field(default=DEFAULT_DIR, description="State dir: stack.json, logs/, redis/.")
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
    names = {ALIASES.get(n.strip().lower(), n.strip().lower()) for n in items if n.strip()}
    unknown = sorted(names - set(SERVICES))
    if unknown:
        raise UserError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    if not names:
        raise UserError(f"--services is empty; known: {', '.join(SERVICES)}")
    for name, needs in NEEDS.items():
        missing = [n for n in needs if name in names and n not in names]
        if missing:
            raise UserError(f"{name} needs {', '.join(missing)}: add it to --services")
    return [n for n in SERVICES if n in names]
