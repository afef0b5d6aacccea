"""Simulators for a rollout worker's sim episodes: one `MetaWorldEnv` per concurrent episode, each on its own thread.

MuJoCo renders offscreen through a GL context (EGL or OSMesa) that is current on the thread that created it, and
`MetaWorldEnv` is not thread-safe; so each simulator is created, stepped and closed on one dedicated thread, and
the asyncio loop awaits it (`Simulator.call`) while other episodes' policy calls proceed. Simulators are created
lazily and reused: `SimulatorPool.take` lends a free one for (task, image size, camera), or makes one.

Audit replays (`SimulatorPool.replay`) are not reused: a `MetaWorldEnv` that has stepped does not reset bit-exactly
to a fresh one's start state, so each replay builds a fresh environment (~3 s of CPU), replays and closes it, all
on one of a few replay threads, and reproduces exactly what `wmpo.sim.replay.replay_actions` gives anywhere else.

Environments are built one at a time (`build_env`): MetaWorld builds its benchmark with NumPy's global random state
(seed, draw, restore), so two built at once on two threads interleave their draws ("Only generated 49 unique goals").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from wmpo.common.tensors import Array
    from wmpo.sim.env import MetaWorldEnv
    from wmpo.sim.replay import Replay

T = TypeVar("T")
SimKey = tuple[str, int, str]  # (task, image size, camera)


def build_env(task: str, image_size: int, camera: str) -> MetaWorldEnv:
    """A new `MetaWorldEnv` (it serialises its own construction across threads)."""
    from wmpo.sim.env import MetaWorldEnv  # MuJoCo and MetaWorld: only for workers that run sim jobs or audits

    return MetaWorldEnv(task, image_size=image_size, camera=camera)


def replay_fresh(task: str, seed: int, actions: Array, image_size: int, camera: str) -> Replay:
    """`replay_actions` in a newly built environment, closed afterwards (bit-exact with any fresh replay)."""
    from wmpo.sim.replay import replay_actions

    env = build_env(task, image_size, camera)
    try:
        return replay_actions(task, seed, actions, image_size=image_size, camera=camera, env=env)
    finally:
        env.close()


class Simulator:
    """One `MetaWorldEnv`, made on first use, living on its own thread."""

    def __init__(self, task: str, image_size: int, camera: str) -> None:
        self.task, self.image_size, self.camera = task, image_size, camera
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sim-{task}")
        self._env: MetaWorldEnv | None = None

    async def call(self, fn: Callable[[MetaWorldEnv], T]) -> T:
        """`fn(env)` on the simulator's thread (the env is created there on the first call)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._apply, fn)

    def _apply(self, fn: Callable[[MetaWorldEnv], T]) -> T:
        if self._env is None:
            self._env = build_env(self.task, self.image_size, self.camera)
        return fn(self._env)

    def close(self) -> None:
        """Free the renderer on its own thread, then end the thread."""
        self._thread.submit(self._close_env).result()
        self._thread.shutdown(wait=True)

    def _close_env(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            env.close()


class SimulatorPool:
    """Free simulators by (task, image size, camera); at most one per episode running at once. Audit replays run on
    up to `replay_threads` threads of their own, each in a fresh environment."""

    def __init__(self, replay_threads: int = 2) -> None:
        self._free: dict[SimKey, list[Simulator]] = defaultdict(list)
        self._all: list[Simulator] = []
        self.replay_threads = replay_threads
        self._replays: ThreadPoolExecutor | None = None

    @contextlib.asynccontextmanager
    async def take(self, task: str, image_size: int, camera: str) -> AsyncIterator[Simulator]:
        """Lend a simulator for one episode (a free one, or a new one) and take it back afterwards."""
        free = self._free[(task, image_size, camera)]
        if free:
            sim = free.pop()
        else:
            sim = Simulator(task, image_size, camera)
            self._all.append(sim)
        try:
            yield sim
        finally:
            free.append(sim)  # a step still running (a cancelled episode) finishes before the next call starts

    async def replay(self, task: str, seed: int, actions: Array, image_size: int, camera: str) -> Replay:
        """`wmpo.sim.replay.replay_actions` of `actions` from `task`'s reset at `seed`, in a fresh environment built,
        stepped and closed on a replay thread (bit-exact: the same frames and flags as any other fresh replay)."""
        if self._replays is None:
            self._replays = ThreadPoolExecutor(max_workers=self.replay_threads, thread_name_prefix="replay")
        replay = partial(replay_fresh, task, seed, actions, image_size, camera)
        return await asyncio.get_running_loop().run_in_executor(self._replays, replay)

    def __len__(self) -> int:
        return len(self._all)

    def close(self) -> None:
        for sim in self._all:
            sim.close()
        self._all.clear()
        self._free.clear()
        if self._replays is not None:
            self._replays.shutdown(wait=True)
            self._replays = None
