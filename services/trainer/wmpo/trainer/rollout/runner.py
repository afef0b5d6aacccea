"""The rollout-worker process: connect, check the services, run until SIGTERM, exit cleanly.

The world model (Triton) is needed only for dream jobs: the worker asks for its spec once at start; when it
does not answer, the worker still starts (sim jobs need only Redis and the policy service), says so, and
asks again at the next dream job, which fails (and is retried elsewhere) while Triton stays unreachable.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from wmpo.common.logs import get_logger
from wmpo.common.metrics import serve_metrics
from wmpo.robot import AsyncPolicyClient
from wmpo.trainer.connections import make_queue, policy_token
from wmpo.trainer.rollout.queue import JobQueue
from wmpo.trainer.rollout.worker import POLICY_OPTIONS, RolloutWorker, WorkerStats
from wmpo.trainer.settings import TrainerSettings
from wmpo.worldmodel.serving.client import AsyncWorldModelClient

log = get_logger(__name__)
QUEUE_METRICS_EVERY_S = 5.0
WORLD_MODEL_PROBE_S = 10.0


async def _export_queue_metrics(queue: JobQueue) -> None:
    while True:
        try:
            await asyncio.to_thread(queue.export_metrics)
        except Exception as exc:  # Redis blips must not stop the worker
            log.warning("could not read queue metrics", error=str(exc))
        await asyncio.sleep(QUEUE_METRICS_EVERY_S)


async def _main(settings: TrainerSettings, name: str, max_jobs: int | None) -> WorkerStats:
    queue = make_queue(settings)
    policy = AsyncPolicyClient(settings.policy_address, POLICY_OPTIONS, token=policy_token(settings))
    dream = AsyncWorldModelClient(settings.dream_address)
    worker = RolloutWorker(
        queue,
        policy,
        dream,
        name=name,
        concurrency=settings.worker_concurrency,
        episode_timeout_s=settings.episode_timeout_s,
    )
    try:
        try:
            await asyncio.wait_for(worker.spec(), WORLD_MODEL_PROBE_S)  # cached for the dream episodes
            dream_status = settings.dream_address
        except Exception as exc:
            dream_status = "unreachable"
            log.warning(
                "the world model is not reachable: this worker runs sim episodes; dream episodes fail until it is",
                dream=settings.dream_address,
                error=str(exc) or type(exc).__name__,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                os._exit(1)  # a second signal: do not wait for the episodes in hand (the queue reclaims them)
            log.info("stopping: finishing the episodes in hand", held=len(worker.held))
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        exporter = asyncio.create_task(_export_queue_metrics(queue))
        log.info(
            "worker ready",
            name=name,
            redis=settings.redis_url,
            policy=settings.policy_address,
            dream=dream_status,
            concurrency=settings.worker_concurrency,
        )
        try:
            return await worker.run(stop, max_jobs=max_jobs)
        finally:
            exporter.cancel()
    finally:
        await policy.close()
        await dream.close()


def run_worker(settings: TrainerSettings, name: str | None = None, max_jobs: int | None = None) -> None:
    """Run one worker process until SIGTERM (or `max_jobs`)."""
    if settings.metrics_port:
        serve_metrics(settings.metrics_port)
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    stats = asyncio.run(_main(settings, name, max_jobs))
    log.info("worker stopped", name=name, completed=stats.completed, failed=stats.failed, frames=stats.frames)
