"""Settings of the trainer processes (rollout workers, learner, control-plane API), from env
``WMPO_TRAINER_*`` or a YAML ``trainer:`` section. Algorithm hyper-parameters live in the run config."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from wmpo.common.config import ServiceSettings


class TrainerSettings(ServiceSettings):
    """Where the trainer finds Redis, the policy and world-model services, and where it writes."""

    model_config = SettingsConfigDict(env_prefix="WMPO_TRAINER_")
    section: ClassVar[str] = "trainer"

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis for the job queue.")
    policy_address: str = Field(default="grpc://127.0.0.1:50051", description="Policy service address.")
    dream_address: str = Field(default="127.0.0.1:8001", description="Triton gRPC address (dream, reward).")
    registry_dir: Path = Field(default=Path("wmpo-data/registry"), description="Policy/world-model registry.")
    runs_dir: Path = Field(default=Path("wmpo-data/runs"), description="Run state, logs and metrics.")
    policy_token_file: Path | None = Field(
        default=None, description="Bearer token for the policy service (first line of the file)."
    )
    queue_name: str = Field(default="episodes", description="Job queue name (Redis keys wmpo:queue:<name>:*).")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Worker/learner Prometheus port (0: off).")
    episode_timeout_s: float = Field(default=600.0, gt=0, description="Longest one episode may take.")
    worker_concurrency: int = Field(default=16, ge=1, description="Episodes one worker runs at once.")
    queue_max_len: int = Field(default=10_000, ge=1, description="Pending jobs before producers wait.")
    visibility_timeout_s: float = Field(
        default=120.0, gt=0, description="A job held this long by a silent worker is reclaimed."
    )
    max_attempts: int = Field(default=3, ge=1, description="Failures before a job goes to the dead-letter stream.")
    api_host: str = Field(default="127.0.0.1", description="Address of the control-plane HTTP API.")
    api_port: int = Field(default=8080, ge=0, le=65535, description="Port of the control-plane HTTP API.")
    api_token_file: Path | None = Field(default=None, description="Token required by mutating API endpoints.")
