"""Settings of the policy server (`wmpo policy serve`): env ``WMPO_POLICY_*`` or a YAML ``policy:`` section."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from wmpo.common.config import ServiceSettings


class PolicyServiceSettings(ServiceSettings):
    """How the policy server listens, what it serves and how it batches."""

    model_config = SettingsConfigDict(env_prefix="WMPO_POLICY_")
    section: ClassVar[str] = "policy"

    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0 in containers).")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port of the Policy service.")
    checkpoint: Path | None = Field(default=None, description="Serve this checkpoint directory (fixed version).")
    registry: str | None = Field(default=None, description="Policy registry URI to serve versions from.")
    version: str = Field(default="latest", description="Version or alias to follow when serving a registry.")
    device: str = Field(default="cpu", description="Torch device: cpu, cuda or cuda:N.")
    max_batch_size: int = Field(default=16, ge=1, description="Largest micro-batch of concurrent Act calls.")
    max_batch_wait_ms: float = Field(
        default=2.0, ge=0.0, description="How long a request may wait for a micro-batch to fill."
    )
    max_resident_versions: int = Field(default=3, ge=1, description="Versions kept loaded (LRU).")
    max_queue: int = Field(default=1024, ge=1, description="Queued requests before RESOURCE_EXHAUSTED.")
    max_message_mb: int = Field(default=16, ge=1, description="Largest gRPC message accepted, in MiB.")
    auth_tokens_file: Path | None = Field(
        default=None, description="File with one bearer token per line; unset = no authentication."
    )
    tls_cert: Path | None = Field(default=None, description="PEM certificate; with tls_key enables TLS.")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")
    redis_url: str | None = Field(
        default=None, description="Redis for new-version notifications; unset = poll the registry."
    )
