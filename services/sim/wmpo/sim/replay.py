"""Open-loop replay: what an action sequence really does in the simulator, from a seeded start state.

An imagined episode that starts from a simulator start state (a reset at a known seed, rendered) can be replayed
here action by action, ignoring what the simulator shows (open loop), to record what really happens: the true
success after every action and the real frames, for comparison with the imagined ones. The environment is a
`MetaWorldEnv` built and reset exactly as rollouts build and reset theirs (`wmpo.sim.rollout`), so the first frame
is the start frame the imagination began from, and replaying an episode's recorded actions reproduces it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from wmpo.common.tensors import Array
from wmpo.sim.env import ACTION_DIM, MetaWorldEnv
from wmpo.sim.tasks import TaskSpec


class Replay(NamedTuple):
    """What really happened when an action sequence was replayed (unpacks as a 3-tuple)."""

    frames: Array  # uint8 [k+1, H, W, C]: the reset frame, then the frame after each replayed action
    success: Array  # bool [k]: the simulator's success flag after each replayed action
    first_success: int | None  # index of the first action after which the task was solved, or None

    @property
    def solved(self) -> bool:
        """Whether the task was solved at any replayed step."""
        return self.first_success is not None


def replay_actions(
    task: str | TaskSpec,
    seed: int,
    actions: Array,
    *,
    image_size: int = 64,
    camera: str = "corner",
    stop_at_success: bool = False,
    env: MetaWorldEnv | None = None,
) -> Replay:
    """Reset `task` at `seed` and apply `actions` (float [N, 4], clipped to [-1, 1] as in rollouts) open-loop.

    Returns the real frames (uint8 [N+1, H, W, C], the reset frame first), the success flag after each action
    (bool [N]) and the index of the first successful action (or None). With `stop_at_success` the replay ends at
    the first success, so only ``k = first_success + 1`` actions are applied. The task's horizon is not applied:
    every given action is replayed.

    By default a fresh environment is built (~3 s) and closed, as a rollout worker builds its own, so the replay is
    bit-exact: the same seed and actions give the same frames and flags as the rollout that recorded them. `env`
    reuses an open environment of the same task, image size and camera (rendering on) to save that time; its start
    state may then differ by the few millimetres MetaWorld's reset leaves of the previous episode's arm pose.
    """
    acts = np.asarray(actions, dtype=np.float32)
    if acts.ndim != 2 or acts.shape[1] != ACTION_DIM:
        raise ValueError(f"actions must be [N, {ACTION_DIM}], got shape {tuple(acts.shape)}")
    if env is not None:
        name = task if isinstance(task, str) else task.name
        mismatch = [
            what
            for what, ok in [
                ("task", env.spec.name == name),
                ("image size", env.image_size == image_size),
                ("camera", env.camera == camera),
                ("rendering", env.render_enabled),
            ]
            if not ok
        ]
        if mismatch:
            raise ValueError(f"the given environment differs from the replay in: {', '.join(mismatch)}")
        return _replay(env, seed, acts, stop_at_success)
    with MetaWorldEnv(task, image_size=image_size, camera=camera, render=True) as fresh:
        return _replay(fresh, seed, acts, stop_at_success)


def _replay(env: MetaWorldEnv, seed: int, actions: Array, stop_at_success: bool) -> Replay:
    frames = [env.reset(seed).image]
    success: list[bool] = []
    first: int | None = None
    for t, action in enumerate(actions):
        result = env.step(action)  # `done` (the task's horizon) is deliberately ignored: replay every action
        frames.append(result.observation.image)
        success.append(result.success)
        if result.success and first is None:
            first = t
            if stop_at_success:
                break
    return Replay(np.stack(frames), np.asarray(success, dtype=bool), first)
