"""Rollout workers: episodes from the job queue, results back to Redis.

A job rolls out where its `environment` says: ``dream`` — policy ↔ world model (`imagine_episode`: frames
from `dream`, success from `reward` on Triton) — or ``sim`` — policy ↔ the real simulator
(`simulate_episode`: a `MetaWorldEnv` reset at the job's seed, rendering the policy's image size, sending
the real proprio, success from the simulator). The world model is only needed for dream jobs: a worker
with no Triton runs sim jobs. One worker process runs up to `concurrency` episodes at once on one asyncio
loop, so its concurrent `Act` calls are micro-batched by the policy server and its `dream`/`reward` calls
by Triton's dynamic batcher; simulators step on their own threads (`rollout/simulators.py`). An ``audit``
dream job (one that starts from a simulator reset) is imagined as any other, then its executed actions — one
per imagined frame, so a chunk cut by success or the horizon contributes only its kept actions — are replayed
open-loop in a fresh simulator from its reset seed, and the real outcome travels back with the imagined one.
Each episode pins the policy version its job names. Held jobs get a heartbeat (so a live, slow episode is
never reclaimed); a worker that dies stops heart-beating and its jobs are reclaimed by others after the
visibility timeout. A failing episode is reported to the queue (retried, then dead-lettered with the error).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np
import redis

from wmpo.common.logs import get_logger
from wmpo.common.metrics import counter, gauge, histogram
from wmpo.common.seeds import step_seed
from wmpo.common.tensors import Array
from wmpo.robot import AsyncPolicyClient, ClientOptions, PolicyClientError, RetryPolicy
from wmpo.sim.env import ACTION_DIM, MetaWorldEnv, SimObservation
from wmpo.trainer.rollout.episodes import ENVIRONMENTS, EpisodeJob, EpisodeResult
from wmpo.trainer.rollout.queue import Job, JobQueue
from wmpo.trainer.rollout.simulators import Simulator, SimulatorPool
from wmpo.worldmodel.rollout_rules import cut_chunk, roll_buffers, start_buffers, trailing_clips
from wmpo.worldmodel.serving.client import AsyncRewardClient, AsyncWorldModelClient, WorldModelSpec

log = get_logger(__name__)

EPISODES = counter("worker_episodes_total", "Episodes finished by this worker.", ["outcome"])
FRAMES = counter("worker_frames_total", "Frames imagined or simulated by this worker.")
ACTIVE = gauge("worker_active_episodes", "Episodes this worker is running now.")
EPISODE_SECONDS = histogram("worker_episode_seconds", "Wall time of one episode.")
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
    policy: AsyncPolicyClient,
    frame: Array,
    camera: str,
    job: EpisodeJob,
    chunk_index: int,
    proprio: Array | None = None,
) -> tuple[Array, Array, Array]:
    """One chunk of the job's pinned policy version -> (actions [T, A], tokens [T, A], log-probs [T, A])."""
    try:
        chunk = await policy.act(
            {camera: frame},
            job.instruction,
            proprio,
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
    simulators: SimulatorPool | None = None,
) -> EpisodeResult:
    """Alternate policy chunks and dreamed frames until the reward model says success or the horizon ends; an audit
    job then replays its executed actions in the simulator (on `simulators`' replay threads)."""
    if job.horizon <= 0:
        raise EpisodeError(f"job {job.job_id}: horizon must be positive, got {job.horizon}")
    if job.audit and (simulators is None or not job.task or job.reset_seed is None):
        raise EpisodeError(
            f"job {job.job_id}: an audited episode needs a task and a reset seed (its start state) and a worker "
            "with simulators"
        )
    frames_in = np.asarray(job.start_frames, np.uint8)
    if frames_in.ndim != 4 or frames_in.shape[1:] != (spec.image_size, spec.image_size, spec.channels):
        raise EpisodeError(
            f"job {job.job_id}: start frames {frames_in.shape} do not match the world model's "
            f"{spec.image_size}x{spec.image_size}x{spec.channels}"
        )
    began = time.monotonic()
    context, history = start_buffers(frames_in, spec.context_frames, spec.clip_len)
    observations, tokens, logprobs, probs, kept, executed = [], [], [], [], [], []
    elapsed, chunk_index, success, wm_version = 0, 0, False, 0
    policy_s = dream_s = 0.0
    keep_frames = job.record_frames or job.audit
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
        executed.append(actions[: len(outcome.frames)])  # the actions whose frames were kept
        if keep_frames:
            kept.append(outcome.frames)
        elapsed += len(outcome.frames)
        chunk_index += 1
        context, history = roll_buffers(context, history, outcome.frames)
        if outcome.done:
            success = outcome.success
            break
    result = EpisodeResult(
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
        frames=np.concatenate([frames_in[-1:], *kept]) if keep_frames else None,
        timings={"policy_s": policy_s, "dream_s": dream_s},
    )
    if job.audit:
        assert simulators is not None and job.reset_seed is not None  # checked above
        t0 = time.monotonic()
        replay = await simulators.replay(
            job.task, job.reset_seed, np.concatenate(executed), spec.image_size, job.camera
        )
        result.timings["replay_s"] = time.monotonic() - t0
        result.real, result.real_success = True, replay.solved
        result.real_step_success, result.real_frames = replay.success, replay.frames
    result.seconds = time.monotonic() - began
    return result


@dataclass
class ChunkSteps:
    """What executing one action chunk in the simulator gave."""

    observation: SimObservation  # after the last step taken
    success: list[bool]  # per step taken
    images: list[Array]  # per step taken, when the job records frames


def execute_chunk(env: MetaWorldEnv, actions: Array, steps_left: int, record: bool) -> ChunkSteps:
    """Step `env` through `actions` (at most `steps_left` > 0), stopping at the first success (on the env's
    thread)."""
    observation: SimObservation | None = None
    success: list[bool] = []
    images: list[Array] = []
    for action in actions[:steps_left]:
        step = env.step(action)
        observation = step.observation
        success.append(step.success)
        if record:
            images.append(observation.image)
        if step.success:
            break
    assert observation is not None, "no step taken"
    return ChunkSteps(observation, success, images)


async def simulate_episode(
    job: EpisodeJob, policy: AsyncPolicyClient, sim: Simulator, camera: str, proprio_dim: int
) -> EpisodeResult:
    """A real episode: reset the simulator at the job's seed, then alternate policy chunks (sent the rendered
    frame and, for a policy that takes it, the real proprio) and simulator steps, until the simulator says
    success or the horizon is reached."""
    if job.horizon <= 0:
        raise EpisodeError(f"job {job.job_id}: horizon must be positive, got {job.horizon}")
    if job.reset_seed is None:
        raise EpisodeError(f"job {job.job_id}: a sim job needs a reset seed")
    reset_seed = job.reset_seed
    began = time.monotonic()
    observation = await sim.call(partial(MetaWorldEnv.reset, seed=reset_seed))
    if proprio_dim not in (0, len(observation.proprio)):
        raise EpisodeError(
            f"policy version {job.policy_version} takes proprio of dim {proprio_dim}; the simulator gives "
            f"{len(observation.proprio)}"
        )
    images: list[Array] = [observation.image] if job.record_frames else []
    observations, proprios, tokens, logprobs = [], [], [], []
    step_success: list[bool] = []
    chunk_index, success = 0, False
    policy_s = sim_s = 0.0
    while True:
        state = np.asarray(observation.proprio, np.float32)[:proprio_dim]
        t0 = time.monotonic()
        actions, toks, logps = await policy_chunk(
            policy, observation.image, camera, job, chunk_index, state if proprio_dim else None
        )
        t1 = time.monotonic()
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or len(actions) == 0:
            raise EpisodeError(
                f"the policy's chunk {actions.shape} does not fit the simulator's {ACTION_DIM}-D actions"
            )
        observations.append(observation.image)
        proprios.append(state)
        tokens.append(toks)
        logprobs.append(logps)
        steps_left = job.horizon - len(step_success)
        done = await sim.call(partial(execute_chunk, actions=actions, steps_left=steps_left, record=job.record_frames))
        sim_s += time.monotonic() - t1
        policy_s += t1 - t0
        observation = done.observation
        step_success.extend(done.success)
        images.extend(done.images)
        chunk_index += 1
        if step_success[-1] or len(step_success) >= job.horizon:
            success = step_success[-1]
            break
    return EpisodeResult(
        job_id=job.job_id,
        group=job.group,
        index=job.index,
        policy_version=job.policy_version,
        world_model_version=0,
        success=success,
        length=len(step_success),
        observations=np.stack(observations),
        tokens=np.stack(tokens).astype(np.int32),
        logprobs=np.stack(logprobs).astype(np.float32),
        success_probs=np.asarray(step_success, np.float32),
        frames=np.stack(images) if job.record_frames else None,
        seconds=time.monotonic() - began,
        timings={"policy_s": policy_s, "sim_s": sim_s},
        proprio=np.stack(proprios).astype(np.float32).reshape(len(proprios), proprio_dim),
        real=True,
    )


class RolloutWorker:
    """Claims episode jobs and runs up to `concurrency` of them at once (dream jobs need `world_model`)."""

    def __init__(
        self,
        queue: JobQueue,
        policy: AsyncPolicyClient,
        world_model: AsyncWorldModelClient | None,
        *,
        name: str,
        concurrency: int = 16,
        episode_timeout_s: float = 600.0,
    ) -> None:
        self.queue, self.policy, self.world_model = queue, policy, world_model
        self.reward = AsyncRewardClient.beside(world_model) if world_model is not None else None
        self.name, self.concurrency, self.episode_timeout_s = name, concurrency, episode_timeout_s
        self.held: dict[str, Job] = {}
        self.stats = WorkerStats()
        self.simulators = SimulatorPool(replay_threads=max(1, min(concurrency, os.cpu_count() or 1)))
        self._spec: WorldModelSpec | None = None

    async def _policy_view(self, version: int) -> tuple[str, int, int]:
        """(camera name, image size, proprio dim) of the pinned policy version (one camera, square images)."""
        try:
            camera = await self.policy.camera(version)  # the client caches a version number's info
            spec = (await self.policy.info(version)).spec
        except PolicyClientError as exc:
            raise EpisodeError(str(exc)) from exc
        if spec.image_height != spec.image_width:
            raise EpisodeError(f"policy version {version} expects {spec.image_height}x{spec.image_width} images")
        return camera, int(spec.image_height), int(spec.proprio_dim)

    async def spec(self) -> WorldModelSpec:
        """The world model's spec (asked once); `EpisodeError` when this worker has no reachable world model."""
        if self._spec is None:
            if self.world_model is None:
                raise EpisodeError("this worker has no world model (dream episodes need Triton)")
            try:
                self._spec = await self.world_model.spec()
            except Exception as exc:
                raise EpisodeError(f"the world model is not reachable: {exc}") from exc
        return self._spec

    async def _episode(self, job: EpisodeJob) -> EpisodeResult:
        if job.environment not in ENVIRONMENTS:
            raise EpisodeError(f"job {job.job_id}: unknown environment {job.environment!r}")
        camera, image_size, proprio_dim = await self._policy_view(job.policy_version)
        if job.environment == "sim":
            async with self.simulators.take(job.task, image_size, job.camera) as sim:
                return await simulate_episode(job, self.policy, sim, camera, proprio_dim)
        if proprio_dim:
            raise EpisodeError(
                f"policy version {job.policy_version} needs proprio (dim {proprio_dim}), which the world model does "
                "not imagine; train it with `wmpo policy train-bc --no-proprio`"
            )
        spec = await self.spec()
        assert self.world_model is not None and self.reward is not None  # spec() checked
        return await imagine_episode(job, self.policy, self.world_model, self.reward, spec, camera, self.simulators)

    async def _run_job(self, job: Job) -> None:
        self.held[job.entry_id] = job
        ACTIVE.inc()
        began = time.monotonic()
        try:
            episode = EpisodeJob.from_bytes(job.payload)
            result = await asyncio.wait_for(self._episode(episode), self.episode_timeout_s)
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
            await asyncio.to_thread(self.simulators.close)
        return self.stats
