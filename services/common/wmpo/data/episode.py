"""`Episode`: one trajectory in memory, with the checks that make it well-formed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wmpo.common.tensors import Array

SOURCES_HELP = "expert, random, policy:<version>, imagined:<run>, or any label"


@dataclass
class Episode:
    """A trajectory of T steps.

    ``frames[t]`` and ``proprio[t]`` are what was observed before ``actions[t]``; the last frame is the
    observation after the last action, so there are T+1 frames and T actions.
    ``step_success[t]`` is the simulator's success flag after ``actions[t]``.
    """

    frames: Array  # uint8 [T+1, H, W, C]
    actions: Array  # float32 [T, A], normalised to [-1, 1], gripper last
    proprio: Array  # float32 [T+1, P]
    step_success: Array  # bool [T]
    instruction: str
    task: str
    source: str  # SOURCES_HELP
    seed: int = -1
    camera: str = "corner"
    episode_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """T, the number of actions."""
        return int(self.actions.shape[0])

    @property
    def success(self) -> bool:
        """Whether the task was solved at any step."""
        return bool(self.step_success.any())

    @property
    def first_success_step(self) -> int | None:
        """Index of the first action after which the task was solved, or None."""
        hits = np.flatnonzero(self.step_success)
        return int(hits[0]) if hits.size else None

    @property
    def frame_success(self) -> Array:
        """bool [T+1]: success as seen in each frame (frame 0 is never a success)."""
        return np.concatenate([[False], self.step_success.astype(bool)])

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency (dtypes, shapes, ranges, labels)."""
        t = self.actions.shape[0] if self.actions.ndim == 2 else -1
        checks = [
            (self.frames.dtype == np.uint8, f"frames must be uint8, got {self.frames.dtype}"),
            (self.frames.ndim == 4 and self.frames.shape[-1] in (1, 3),
             f"frames must be [T+1, H, W, C], got {self.frames.shape}"),
            (self.actions.ndim == 2 and t >= 1, f"actions must be [T, A] with T >= 1, got {self.actions.shape}"),
            (self.frames.shape[0] == t + 1, f"{self.frames.shape[0]} frames for {t} actions (need T+1)"),
            (self.proprio.ndim == 2 and self.proprio.shape[0] == t + 1,
             f"proprio must be [T+1, P], got {self.proprio.shape}"),
            (self.step_success.shape == (t,), f"step_success must be [T], got {self.step_success.shape}"),
            (bool(np.isfinite(self.actions).all()), "actions hold non-finite values"),
            (bool(np.abs(self.actions).max(initial=0.0) <= 1.0 + 1e-6), "actions must lie in [-1, 1]"),
            (bool(np.isfinite(self.proprio).all()), "proprio holds non-finite values"),
            (bool(self.instruction.strip()), "instruction is empty"),
            (bool(self.task), "task is empty"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class EpisodeInfo:
    """What a dataset knows of an episode without reading its frames."""

    episode_id: str
    path: str
    task: str
    instruction: str
    source: str
    seed: int
    length: int
    success: bool
    first_success_step: int | None
    image_shape: tuple[int, int, int]
    action_dim: int
    proprio_dim: int
