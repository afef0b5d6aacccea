"""What a trainer process (learner, rollout worker, control plane) opens from its settings: the job queue, the
version registries, the policy service as an action source, the policy token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wmpo.common.auth import first_token
from wmpo.common.registry import Registry
from wmpo.trainer.rollout.queue import JobQueue
from wmpo.trainer.settings import TrainerSettings

if TYPE_CHECKING:
    from wmpo.sim.sources import SourceSpec


def make_queue(settings: TrainerSettings) -> JobQueue:
    """The job queue the settings describe (one Redis connection pool, shared by threads)."""
    return JobQueue(
        settings.redis_url,
        settings.queue_name,
        max_len=settings.queue_max_len,
        visibility_timeout_s=settings.visibility_timeout_s,
        max_attempts=settings.max_attempts,
    )


def open_registry(settings: TrainerSettings, kind: str, *, notify: bool = True) -> Registry:
    """The `kind` registry under ``settings.registry_dir``; with `notify`, alias moves are announced on Redis."""
    return Registry(settings.registry_dir, kind, (settings.redis_url or None) if notify else None)


def policy_token(settings: TrainerSettings) -> str | None:
    """The bearer token workers and the learner send to the policy service (None: no auth)."""
    return first_token(settings.policy_token_file)


def policy_source(settings: TrainerSettings, version: int, temperature: float = 0.0) -> SourceSpec:
    """Policy `version` served by the policy service, as a simulator action source (0: greedy)."""
    from wmpo.sim.sources import SourceSpec  # the simulator stack: not for rollout workers

    return SourceSpec(
        settings.policy_address, version=str(version), temperature=temperature, token=policy_token(settings)
    )
