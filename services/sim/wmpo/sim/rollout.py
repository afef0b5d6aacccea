"""Running episodes in the simulator: one (`run_episode`) or many in parallel worker processes (`run_many`)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wmpo.common.tensors import Array
from wmpo.data.episode import Episode
from wmpo.data.store import EpisodeStore
from wmpo.sim.env import MetaWorldEnv
from wmpo.sim.sources import ActionSource, SourceSpec, build_source
from wmpo.sim.tasks import TaskSpec


@dataclass
class EpisodeResult:
    """The outcome of one simulated episode."""

    seed: int
    success: bool
    length: int  # actions taken until the first success, or the horizon
    source: str
    episode_path: str | None = None
    frames: Array | None = field(default=None, repr=False)


def run_episode(
    env: MetaWorldEnv,
    source: ActionSource,
    seed: int,
    *,
    steps_after_success: int = 0,
) -> tuple[Episode, int]:
    """Roll `source` out from the start state of `seed` until success (plus `steps_after_success`
    more steps, so that recorded data shows what follows success) or the horizon.

    Returns the recorded episode and the number of actions taken until the first success (the
    horizon when there was none).
    """
    source.reset(seed)
    obs = env.reset(seed)
    frames, proprio, actions, success = [obs.image], [obs.proprio], [], []
    first_success: int | None = None
    done = False
    while not done:
        chunk = source.act(env, obs)
        for action in chunk:
            result = env.step(action)
            obs = result.observation
            frames.append(obs.image)
            proprio.append(obs.proprio)
            actions.append(np.asarray(action, np.float32))
            success.append(result.success)
            if result.success and first_success is None:
                first_success = len(actions)
            after = first_success is not None and len(actions) - first_success >= steps_after_success
            if result.done or after:
                done = True
                break
    episode = Episode(
        frames=np.stack(frames),
        actions=np.clip(np.stack(actions), -1.0, 1.0),
        proprio=np.stack(proprio),
        step_success=np.asarray(success, bool),
        instruction=env.spec.instruction,
        task=env.spec.name,
        source=source.label,
        seed=seed,
        camera=env.camera,
    )
    return episode, first_success if first_success is not None else len(actions)


@dataclass(frozen=True)
class _Job:
    task: TaskSpec
    spec: SourceSpec
    image_size: int
    camera: str
    render: bool
    out_dir: str | None
    steps_after_success: int
    keep_frames_for: frozenset[int]
    max_steps: int | None


_worker: dict[str, Any] = {}


def _init_worker(job: _Job) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # one core per worker process (checkpoint policies run torch)
    except ImportError:
        pass
    _worker["job"] = job
    _worker["env"] = MetaWorldEnv(
        job.task, image_size=job.image_size, camera=job.camera, render=job.render, max_steps=job.max_steps
    )
    _worker["source"] = build_source(job.spec)
    _worker["store"] = EpisodeStore(job.out_dir) if job.out_dir else None


def _close_worker() -> None:
    for key in ("source", "env"):
        obj = _worker.pop(key, None)
        if obj is not None:
            obj.close()


def _run_seed(seed: int) -> EpisodeResult:
    job: _Job = _worker["job"]
    episode, length = run_episode(_worker["env"], _worker["source"], seed, steps_after_success=job.steps_after_success)
    path = None
    if _worker["store"] is not None:
        path = str(_worker["store"].write(episode))
    frames = episode.frames if seed in job.keep_frames_for else None
    return EpisodeResult(seed, episode.success, length, episode.source, path, frames)


def _pool_worker(job: _Job, seeds: Any, results: Any) -> None:
    try:
        _init_worker(job)
        while (seed := seeds.get()) is not None:
            try:
                results.put(("ok", _run_seed(seed)))
            except Exception as exc:  # report, never hang the parent
                results.put(("error", f"seed {seed}: {type(exc).__name__}: {exc}"))
    except Exception as exc:
        results.put(("error", f"worker start: {type(exc).__name__}: {exc}"))
    finally:
        _close_worker()


def run_many(
    task: TaskSpec,
    spec: SourceSpec,
    seeds: Sequence[int],
    *,
    workers: int = 1,
    image_size: int = 64,
    camera: str = "corner",
    render: bool = True,
    out_dir: Path | None = None,
    steps_after_success: int = 0,
    keep_frames_for: Sequence[int] = (),
    max_steps: int | None = None,
) -> Iterator[EpisodeResult]:
    """Run one episode per seed, yielding results as they finish (in any order).

    With ``workers > 1`` the episodes run in that many spawned processes (one simulator each); with
    `out_dir` each episode is written to that dataset by the process that ran it. A failing episode
    raises RuntimeError with the worker's reason after the other workers are stopped.
    """
    job = _Job(task, spec, image_size, camera, render, str(out_dir) if out_dir else None,
               steps_after_success, frozenset(keep_frames_for), max_steps)  # fmt: skip
    workers = max(1, min(workers, len(seeds)))
    if workers == 1:
        _init_worker(job)
        try:
            for seed in seeds:
                yield _run_seed(seed)
        finally:
            _close_worker()
        return
    ctx = mp.get_context("spawn")  # EGL contexts and torch threads do not survive fork
    seed_queue: Any = ctx.Queue()
    result_queue: Any = ctx.Queue()
    for seed in seeds:
        seed_queue.put(seed)
    for _ in range(workers):
        seed_queue.put(None)
    procs = [
        ctx.Process(target=_pool_worker, args=(job, seed_queue, result_queue), daemon=True) for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in seeds:
            status, payload = _get_result(result_queue, procs)
            if status == "error":
                raise RuntimeError(f"simulation failed: {payload}")
            yield payload
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)


def _get_result(results: Any, procs: list[Any]) -> tuple[str, Any]:
    import queue

    while True:
        try:
            item: tuple[str, Any] = results.get(timeout=1.0)
            return item
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                raise RuntimeError("all simulation workers exited unexpectedly") from None
