"""Rollout workers: imagined episodes from the job queue, policy ↔ world model, results back to Redis.

One worker process runs up to `concurrency` episodes at once on one asyncio loop, so its concurrent `Act`
calls are micro-batched by the policy server and its `dream`/`reward` calls by Triton's dynamic batcher.
Each episode pins the policy version its job names. Held jobs get a heartbeat (so a live, slow episode is
never reclaimed); a worker that dies stops heart-beating and its jobs are reclaimed by others after the
visibility timeout. A failing episode is reported to the queue (retried, then dead-lettered with the error).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import redis

from wmpo.common.logs import get_logger
from wmpo.common.metrics import counter, gauge, histogram
from wmpo.common.seeds import step_seed
from wmpo.common.tensors import Array
from wmpo.robot import AsyncPolicyClient, ClientOptions, PolicyClientError, RetryPolicy
from wmpo.trainer.rollout.episodes import EpisodeJob, EpisodeResult
from wmpo.trainer.rollout.queue import Job, JobQueue
from wmpo.worldmodel.rollout_rules import cut_chunk, roll_buffers, start_buffers, trailing_clips
from wmpo.worldmodel.serving.client import AsyncRewardClient, AsyncWorldModelClient, WorldModelSpec

log = get_logger(__name__)

EPISODES = counter("worker_episodes_total", "Imagined episodes finished by this worker.", ["outcome"])
FRAMES = counter("worker_frames_total", "Frames imagined by this worker.")
ACTIVE = gauge("worker_active_episodes", "Episodes this worker is running now.")
EPISODE_SECONDS = histogram("worker_episode_seconds", "Wall time of one imagined episode.")
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
REDIS_RETRY_S = 1.0
T = TypeVar("T")


class EpisodeError(RuntimeError):
    """An episode that cannot be rolled out as asked (its job goes back to the queue with this message)."""


@dataclass
class WorkerStats:
    completed: int = 0
    duplicates: int = 0
    failed: int = 0
    frames: int = 0
    started: float = field(default_factory=time.monotonic)


POLICY_OPTIONS = ClientOptions(timeout_s=60.0, retry=RetryPolicy(retries=5, backoff_s=0.2))
"""How workers call the policy: a long deadline (a busy server queues Act calls), more patient retries."""


async def policy_chunk(
    policy: AsyncPolicyClient, frame: Array, camera: str, job: EpisodeJob, chunk_index: int
) -> tuple[Array, Array, Array]:
    """One chunk of the job's pinned policy version -> (actions [T, A], tokens [T, A], log-probs [T, A])."""
    try:
        chunk = await policy.act(
            {camera: frame},
            job.instruction,
            version=job.policy_version,
            temperature=job.temperature,
            seed=step_seed(job.seed, chunk_index),
            return_logprobs=True,
        )
    except PolicyClientError as exc:
        raise EpisodeError(f"policy Act failed: {exc}") from exc
    if chunk.logprobs is None:
        raise EpisodeError("the policy server returned no log-probs")
    if chunk.policy_version != job.policy_version:
        raise EpisodeError(f"asked for policy version {job.policy_version}, answered by {chunk.policy_version}")
    return chunk.actions, chunk.token_ids, chunk.logprobs


async def imagine_episode(
    job: EpisodeJob,
    policy: AsyncPolicyClient,
    world_model: AsyncWorldModelClient,
    reward: AsyncRewardClient,
    spec: WorldModelSpec,
    camera: str,
) -> EpisodeResult:
    """Alternate policy chunks and dreamed frames until the reward model says success or the horizon ends."""
    if job.horizon <= 0:
        raise EpisodeError(f"job {job.job_id}: horizon must be positive, got {job.horizon}")
    frames_in = np.asarray(job.start_frames, np.uint8)
    if frames_in.ndim != 4 or frames_in.shape[1:] != (spec.image_size, spec.image_size, spec.channels):
        raise EpisodeError(
            f"job {job.job_id}: start frames {frames_in.shape} do not match the world model's "
            f"{spec.image_size}x{spec.image_size}x{spec.channels}"
        )
    began = time.monotonic()
    context, history = start_buffers(frames_in, spec.context_frames, spec.clip_len)
    observations, tokens, logprobs, probs, kept = [], [], [], [], []
    elapsed, chunk_index, success, wm_version = 0, 0, False, 0
    policy_s = dream_s = 0.0
    while True:
        t0 = time.monotonic()
        actions, toks, logps = await policy_chunk(policy, context[-1], camera, job, chunk_index)
        if actions.shape != (spec.future_frames, spec.action_dim):
            raise EpisodeError(
                f"the policy's chunk {actions.shape} does not match the world model's "
                f"({spec.future_frames}, {spec.action_dim})"
            )
        t1 = time.monotonic()
        new_frames, wm_version = await world_model.imagine(context, actions, step_seed(job.seed, elapsed))
        chunk_probs = await reward.probability(trailing_clips(history, new_frames, spec.clip_len))
        dream_s += time.monotonic() - t1
        policy_s += t1 - t0
        outcome = cut_chunk(new_frames, chunk_probs, job.success_threshold, job.horizon - elapsed)
        observations.append(context[-1])
        tokens.append(toks)
        logprobs.append(logps)
        probs.append(outcome.probs)
        if job.record_frames:
            kept.append(outcome.frames)
        elapsed += len(outcome.frames)
        chunk_index += 1
        context, history = roll_buffers(context, history, outcome.frames)
        if outcome.done:
            success = outcome.success
            break
    return EpisodeResult(
        job_id=job.job_id,
        group=job.group,
        index=job.index,
        policy_version=job.policy_version,
        world_model_version=wm_version,
        success=success,
        length=elapsed,
        observations=np.stack(observations),
        tokens=np.stack(tokens).astype(np.int32),
        logprobs=np.stack(logprobs).astype(np.float32),
        success_probs=np.concatenate(probs).astype(np.float32),
        frames=np.concatenate([frames_in[-1:], *kept]) if job.record_frames else None,
        seconds=time.monotonic() - began,
        timings={"policy_s": policy_s, "dream_s": dream_s},
    )


class RolloutWorker:
    """Claims episode jobs and runs up to `concurrency` of them at once."""

    def __init__(
        self,
        queue: JobQueue,
        policy: AsyncPolicyClient,
        world_model: AsyncWorldModelClient,
        *,
        name: str,
        concurrency: int = 16,
        episode_timeout_s: float = 600.0,
    ) -> None:
        self.queue, self.policy, self.world_model = queue, policy, world_model
        self.reward = AsyncRewardClient.beside(world_model)
        self.name, self.concurrency, self.episode_timeout_s = name, concurrency, episode_timeout_s
        self.held: dict[str, Job] = {}
        self.stats = WorkerStats()
        self._spec: WorldModelSpec | None = None

    async def _camera(self, version: int) -> str:
        """The camera the pinned policy version expects (one: the world model renders one view, no proprio)."""
        try:
            camera = await self.policy.camera(version)  # the client caches a version number's info
            proprio_dim = (await self.policy.info(version)).spec.proprio_dim
        except PolicyClientError as exc:
            raise EpisodeError(str(exc)) from exc
        if proprio_dim:
            raise EpisodeError(
                f"policy version {version} needs proprio (dim {proprio_dim}), which the world model does "
                "not imagine; train it with `wmpo policy train-bc --no-proprio`"
            )
        return camera

    async def spec(self) -> WorldModelSpec:
        if self._spec is None:
            self._spec = await self.world_model.spec()
        return self._spec

    async def _run_job(self, job: Job) -> None:
        self.held[job.entry_id] = job
        ACTIVE.inc()
        began = time.monotonic()
        try:
            episode = EpisodeJob.from_bytes(job.payload)
            camera = await self._camera(episode.policy_version)
            result = await asyncio.wait_for(
                imagine_episode(episode, self.policy, self.world_model, self.reward, await self.spec(), camera),
                self.episode_timeout_s,
            )
            result.worker, result.attempt = self.name, job.attempt
            first = await self._queue_call(self.queue.complete, job, result.to_bytes())
            self.stats.completed += int(first)
            self.stats.duplicates += int(not first)
            self.stats.frames += result.length
            FRAMES.inc(result.length)
            EPISODES.labels(outcome="success" if result.success else "failure").inc()
            EPISODE_SECONDS.observe(time.monotonic() - began)
        except Exception as exc:  # any failure goes back to the queue with its message
            message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, EpisodeError) else str(exc)
            if isinstance(exc, TimeoutError):
                message = f"the episode took longer than {self.episode_timeout_s:.0f} s"
            dead = await self._queue_call(self.queue.fail, job, message)
            self.stats.failed += 1
            EPISODES.labels(outcome="error").inc()
            log.warning("episode failed", job=job.job_id, attempt=job.attempt, dead_lettered=dead, error=message)
        finally:
            self.held.pop(job.entry_id, None)
            ACTIVE.dec()

    async def _queue_call(self, fn: Callable[..., T], *args: Any) -> T:
        """A queue call that waits out a Redis restart (up to a visibility timeout) instead of losing a result."""
        deadline = time.monotonic() + self.queue.visibility_timeout_s
        while True:
            try:
                return await asyncio.to_thread(fn, *args)
            except REDIS_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("cannot reach the job queue; retrying", error=str(exc))
                await asyncio.sleep(REDIS_RETRY_S)

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.held:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.queue.heartbeat, self.name, list(self.held))

    async def run(self, stop: asyncio.Event | None = None, max_jobs: int | None = None) -> WorkerStats:
        """Work until `stop` is set (finishing the episodes in hand) or `max_jobs` were taken."""
        stop = stop or asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        taken = 0
        beat = asyncio.create_task(self._heartbeat(max(0.05, self.queue.visibility_timeout_s / 3)))
        try:
            while not stop.is_set() and (max_jobs is None or taken < max_jobs):
                free = self.concurrency - len(tasks)
                if max_jobs is not None:
                    free = min(free, max_jobs - taken)
                if free <= 0:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    jobs = await asyncio.to_thread(self.queue.claim, self.name, free, 200 if tasks else 1000)
                except REDIS_ERRORS as exc:  # Redis restarting: wait for it, the jobs are safe there
                    log.warning("cannot reach the job queue; retrying", error=str(exc))
                    await asyncio.sleep(REDIS_RETRY_S)
                    continue
                for job in jobs:
                    task = asyncio.create_task(self._run_job(job))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                taken += len(jobs)
            if tasks:
                await asyncio.wait(tasks)
        finally:
            beat.cancel()
        return self.stats
