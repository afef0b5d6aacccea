"""`MetaWorldEnv`: the small environment interface wmpo uses, over a MetaWorld task.

reset(seed) -> observation; step(action) -> (observation, success, done). Observations carry an RGB
camera frame (uint8 HWC, rendered offscreen with MuJoCo through EGL by default, or OSMesa), the
proprio state (hand xyz and gripper opening), and the instruction. Actions are 4-D (dx, dy, dz,
gripper) in [-1, 1]. The seed fixes the start state: object and goal positions are drawn from it.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from wmpo.common.errors import UserError
from wmpo.common.tensors import Array
from wmpo.sim.tasks import TaskSpec, get_task

# MetaWorld's experts and gymnasium's passive checker warn on every episode about things we handle.
warnings.filterwarnings("ignore", category=UserWarning, module=r"metaworld\..*|gymnasium\..*")

ACTION_DIM = 4
PROPRIO_DIM = 4
RENDER_HELP = (
    "MuJoCo offscreen rendering failed (MUJOCO_GL={backend}): install Debian's libegl1 libegl-mesa0 "
    "libgl1-mesa-dri (`make sim-deps` does, as root), or libosmesa6 and set MUJOCO_GL=osmesa"
)


@dataclass
class SimObservation:
    """What the policy sees (image, proprio, instruction) plus the full state the scripted expert needs."""

    image: Array  # uint8 [H, W, 3]
    proprio: Array  # float32 [4]: hand x, y, z, gripper opening
    instruction: str
    state: Array  # float64 [39]: MetaWorld's full observation (object poses, goal); experts only


@dataclass
class StepResult:
    observation: SimObservation
    success: bool
    done: bool  # the step limit is reached


_CONSTRUCTION = threading.Lock()
"""Held while a `MetaWorldEnv` is built: threads of one process building at once corrupt each other's tasks."""


class MetaWorldEnv:
    """One MetaWorld task with offscreen rendering. Not thread-safe; one per process or thread."""

    action_dim = ACTION_DIM
    proprio_dim = PROPRIO_DIM

    def __init__(
        self,
        task: str | TaskSpec,
        *,
        image_size: int = 64,
        camera: str = "corner",
        render: bool = True,
        max_steps: int | None = None,
    ) -> None:
        self.spec = get_task(task) if isinstance(task, str) else task
        self.image_size = image_size
        self.camera = camera
        self.render_enabled = render
        self.max_steps = max_steps or self.spec.max_steps
        os.environ.setdefault("MUJOCO_GL", "egl")
        import metaworld
        from metaworld.policies import ENV_POLICY_MAP

        with _CONSTRUCTION:  # MetaWorld builds tasks with NumPy's global random state: one build at a time
            benchmark = metaworld.MT1(self.spec.env_name, seed=0)  # type: ignore[no-untyped-call]
            env_cls = benchmark.train_classes[self.spec.env_name]
            self._env: Any = env_cls(
                render_mode="rgb_array" if render else None, width=image_size, height=image_size, camera_name=camera
            )
            self._env.set_task(benchmark.train_tasks[0])
        # Draw object/goal positions from the reset seed instead of the 50 fixed MT1 variations
        # (MetaWorld ignores reset(seed=...): it needs seed() and seeded_rand_vec).
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True
        self._env.max_path_length = 1_000_000  # the step limit is ours (max_steps), not MetaWorld's
        quality = self._env.model.vis.quality
        quality.shadowsize = 0  # shadows and multi-sampling off: ~4x faster rendering on CPU
        quality.offsamples = 0
        self._env.model.mat_reflectance[:] = 0.0
        self._expert = ENV_POLICY_MAP[self.spec.env_name]()  # type: ignore[abstract]
        self._steps = 0
        self._state: Array = np.zeros(39)

    def reset(self, seed: int) -> SimObservation:
        """Start an episode whose start state is determined by `seed`."""
        self._env.seed(int(seed))
        state, _info = self._env.reset()
        self._steps = 0
        return self._observe(state)

    def step(self, action: Array) -> StepResult:
        """Apply one action (clipped to [-1, 1]); `done` once `max_steps` actions have been taken."""
        act = np.clip(np.asarray(action, dtype=np.float64).reshape(ACTION_DIM), -1.0, 1.0)
        state, _reward, _terminated, _truncated, info = self._env.step(act)
        self._steps += 1
        return StepResult(self._observe(state), bool(info["success"]), self._steps >= self.max_steps)

    def expert_action(self, observation: SimObservation) -> Array:
        """The scripted expert's action for this state, in [-1, 1]."""
        return np.clip(self._expert.get_action(observation.state), -1.0, 1.0).astype(np.float32)

    def _observe(self, state: Array) -> SimObservation:
        self._state = np.asarray(state, dtype=np.float64)
        if self.render_enabled:
            try:
                frame = self._env.render()
            except Exception as exc:  # EGL/OSMesa errors surface as many types
                raise UserError(RENDER_HELP.format(backend=os.environ.get("MUJOCO_GL"))) from exc
            image = np.ascontiguousarray(frame[::-1])  # MuJoCo's frames come out upside down
        else:
            image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        return SimObservation(
            image=image,
            proprio=self._state[:PROPRIO_DIM].astype(np.float32),
            instruction=self.spec.instruction,
            state=self._state,
        )

    def close(self) -> None:
        """Free the renderer (do it before exit: EGL contexts freed at interpreter shutdown warn)."""
        env, self._env = self._env, None
        if env is not None:
            env.close()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
