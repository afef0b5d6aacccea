"""Simulators for a rollout worker's sim episodes: one `MetaWorldEnv` per concurrent episode, each on its own thread.

MuJoCo renders offscreen through a GL context (EGL or OSMesa) that is current on the thread that created it, and
`MetaWorldEnv` is not thread-safe; so each simulator is created, stepped and closed on one dedicated thread, and
the asyncio loop awaits it (`Simulator.call`) while other episodes' policy calls proceed. Simulators are created
lazily and reused: `SimulatorPool.take` lends a free one for (task, image size, camera), or makes one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from wmpo.sim.env import MetaWorldEnv

T = TypeVar("T")
SimKey = tuple[str, int, str]  # (task, image size, camera)


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
            from wmpo.sim.env import MetaWorldEnv  # MuJoCo and MetaWorld: only for workers that run sim jobs

            self._env = MetaWorldEnv(self.task, image_size=self.image_size, camera=self.camera)
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
    """Free simulators by (task, image size, camera); at most one per episode running at once."""

    def __init__(self) -> None:
        self._free: dict[SimKey, list[Simulator]] = defaultdict(list)
        self._all: list[Simulator] = []

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

    def __len__(self) -> int:
        return len(self._all)

    def close(self) -> None:
        for sim in self._all:
            sim.close()
        self._all.clear()
        self._free.clear()
