"""Settings of the world-model service (Triton `dream`/`reward` and the Imagination API), from env
``WMPO_WORLDMODEL_*`` or a YAML ``worldmodel:`` section."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from wmpo.common.config import ServiceSettings


class WorldModelServiceSettings(ServiceSettings):
    """Where the models come from, Triton's ports and batching, and the Imagination sessions."""

    model_config = SettingsConfigDict(env_prefix="WMPO_WORLDMODEL_")
    section: ClassVar[str] = "worldmodel"

    checkpoint: Path | None = Field(default=None, description="World-model checkpoint directory.")
    reward_checkpoint: Path | None = Field(default=None, description="Reward-model checkpoint directory.")
    device: str = Field(default="cpu", description="Torch device: cpu, cuda or cuda:N.")
    triton_grpc_port: int = Field(default=8001, ge=1, le=65535, description="Triton KServe-v2 gRPC port.")
    triton_http_port: int = Field(default=8000, ge=1, le=65535, description="Triton KServe-v2 HTTP port.")
    triton_metrics_port: int = Field(default=8002, ge=1, le=65535, description="Triton Prometheus port.")
    max_batch_size: int = Field(default=32, ge=1, description="Triton dynamic batching: largest batch.")
    max_queue_delay_us: int = Field(
        default=2000, ge=0, description="Triton dynamic batching: longest wait for a batch to fill (µs)."
    )
    sampler_steps: int = Field(default=3, ge=1, le=50, description="Euler steps per imagined frame chunk.")
    success_threshold: float = Field(
        default=0.96, gt=0.0, le=1.0, description="Reward-model probability that counts as success."
    )
    host: str = Field(default="127.0.0.1", description="Address the Imagination API listens on.")
    imagination_port: int = Field(default=50052, ge=0, le=65535, description="gRPC port of the Imagination API.")
    triton_url: str = Field(default="127.0.0.1:8001", description="Triton gRPC address the Imagination API uses.")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis holding session state.")
    session_ttl_s: int = Field(default=600, ge=1, description="Idle Imagination sessions expire after this.")
    max_sessions: int = Field(default=4096, ge=1, description="Open sessions before RESOURCE_EXHAUSTED.")
    default_horizon: int = Field(default=128, ge=1, description="Imagined frames per episode when unset.")
