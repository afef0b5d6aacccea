"""What a trainer process (learner or rollout worker) opens from its settings: the job queue, the policy token."""

from __future__ import annotations

from wmpo.common.auth import first_token
from wmpo.trainer.rollout.queue import JobQueue
from wmpo.trainer.settings import TrainerSettings


def make_queue(settings: TrainerSettings) -> JobQueue:
    """The job queue the settings describe (one Redis connection pool, shared by threads)."""
    return JobQueue(
        settings.redis_url,
        settings.queue_name,
        max_len=settings.queue_max_len,
        visibility_timeout_s=settings.visibility_timeout_s,
        max_attempts=settings.max_attempts,
    )


def policy_token(settings: TrainerSettings) -> str | None:
    """The bearer token workers and the learner send to the policy service (None: no auth)."""
    return first_token(settings.policy_token_file)
