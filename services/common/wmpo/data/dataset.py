"""`TrajectoryDataset`: the one API through which every trainer reads trajectories.

Opening a dataset lists its episode files and verifies each (by default reading it whole, so checksum
errors surface now, not mid-training); files that fail are logged, recorded in `problems` and skipped,
never half-read. Views are plain numpy (no torch), indexed by integers, for any training loop:

- `world_model_windows(K, F)`: K context frames (the first frame repeated before the episode start),
  then F actions and the F frames they lead to.
- `reward_clips(N)`: the N frames up to a frame, labelled with the success flag of that frame.
- `policy_samples(T)`: one observation, its instruction, and the next T actions (padded, with a mask).
- `start_states(K)`: (episode, step) pairs before success, where imagined episodes can start.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wmpo.common.logs import get_logger
from wmpo.common.tensors import Array
from wmpo.data.episode import Episode, EpisodeInfo
from wmpo.data.store import CorruptEpisodeError, EpisodeStore

log = get_logger(__name__)


@dataclass(frozen=True)
class DatasetSummary:
    """Counts `wmpo data info` prints."""

    episodes: int
    steps: int
    successes: int
    tasks: dict[str, int]
    sources: dict[str, int]
    image_shapes: list[tuple[int, int, int]]
    problems: list[tuple[str, str]]

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes,
            "steps": self.steps,
            "successes": self.successes,
            "success_rate": self.success_rate,
            "tasks": self.tasks,
            "sources": self.sources,
            "image_shapes": [list(s) for s in self.image_shapes],
            "problems": [{"path": p, "reason": r} for p, r in self.problems],
        }


class TrajectoryDataset:
    """The episodes of a dataset folder, verified, with views for each trainer.

    `filter` keeps only episodes whose `EpisodeInfo` it accepts (e.g. one task). Episodes are cached in
    memory once read (`cache=False` reads them again each time).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        verify: bool = True,
        cache: bool = True,
        filter: Callable[[EpisodeInfo], bool] | None = None,
    ) -> None:
        self.root = Path(root)
        self.store = EpisodeStore(self.root)
        self.problems: list[tuple[str, str]] = []
        self._cache: dict[str, Episode] | None = {} if cache else None
        self.episodes: list[EpisodeInfo] = []
        for path in self.store.paths():
            try:
                info = self.store.info(path)
                if filter is not None and not filter(info):
                    continue
                if verify:
                    episode = self.store.read(path)
                    if self._cache is not None:
                        self._cache[info.episode_id] = episode
            except CorruptEpisodeError as exc:
                self.problems.append((str(path), exc.reason))
                log.warning("skipping unreadable episode", path=str(path), reason=exc.reason)
                continue
            self.episodes.append(info)
        self._by_id = {e.episode_id: e for e in self.episodes}

    def __len__(self) -> int:
        return len(self.episodes)

    def episode(self, key: int | str) -> Episode:
        """An episode by position or id, read whole (and cached)."""
        info = self.episodes[key] if isinstance(key, int) else self._by_id[key]
        if self._cache is not None and info.episode_id in self._cache:
            return self._cache[info.episode_id]
        episode = self.store.read(Path(info.path))
        if self._cache is not None:
            self._cache[info.episode_id] = episode
        return episode

    def summary(self) -> DatasetSummary:
        """Episode/step/success counts, per task and source, and the problems found."""
        return DatasetSummary(
            episodes=len(self.episodes),
            steps=sum(e.length for e in self.episodes),
            successes=sum(e.success for e in self.episodes),
            tasks=dict(Counter(e.task for e in self.episodes)),
            sources=dict(Counter(e.source for e in self.episodes)),
            image_shapes=sorted({e.image_shape for e in self.episodes}),
            problems=list(self.problems),
        )

    def world_model_windows(self, context: int = 4, future: int = 8) -> WorldModelWindows:
        """Windows of K context frames + F actions + F future frames (see `WorldModelWindows`)."""
        return WorldModelWindows(self, context, future)

    def reward_clips(self, clip_len: int = 8) -> RewardClips:
        """Clips of the N frames ending at each frame, labelled with that frame's success."""
        return RewardClips(self, clip_len)

    def policy_samples(self, chunk: int = 8) -> PolicySamples:
        """(image, proprio, instruction, next `chunk` actions) for imitation learning."""
        return PolicySamples(self, chunk)

    def start_states(self, context: int = 4) -> list[tuple[str, int]]:
        """(episode id, frame index) of every frame before the episode's first success."""
        states: list[tuple[str, int]] = []
        for info in self.episodes:
            last = info.length if info.first_success_step is None else info.first_success_step
            states.extend((info.episode_id, t) for t in range(last + 1) if t <= info.length - 1)
        return states

    def context_frames(self, episode_id: str, step: int, context: int = 4) -> Array:
        """uint8 [K, H, W, C]: the K frames up to `step`, the first frame repeated before the start."""
        frames = self.episode(episode_id).frames
        idx = np.clip(np.arange(step - context + 1, step + 1), 0, None)
        return frames[idx]


def split_episodes(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of episode positions into (train, validation); no validation when there are fewer than
    two episodes or `fraction` is 0 (then everything trains)."""
    ids = list(range(count))
    if count < 2 or fraction <= 0:
        return ids, []
    random.Random(seed).shuffle(ids)
    n_val = max(1, round(count * fraction))
    return sorted(ids[n_val:]), sorted(ids[:n_val])


def _index(episodes: Iterable[EpisodeInfo], count: Callable[[EpisodeInfo], int]) -> Array:
    rows = [(i, t) for i, info in enumerate(episodes) for t in range(max(count(info), 0))]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


class WorldModelWindows:
    """Item i: ``context`` uint8 [K,H,W,C] (frames t-K+1..t, clamped at 0), ``actions`` float32 [F,A]
    (actions t..t+F-1) and ``future`` uint8 [F,H,W,C] (frames t+1..t+F): frame t+j+1 follows action t+j."""

    def __init__(self, dataset: TrajectoryDataset, context: int, future: int) -> None:
        if context < 1 or future < 1:
            raise ValueError("context and future must be >= 1")
        self.dataset, self.context, self.future = dataset, context, future
        self.index = _index(dataset.episodes, lambda e: e.length - future + 1)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        e, t = (int(v) for v in self.index[i])
        ep = self.dataset.episode(e)
        ctx = np.clip(np.arange(t - self.context + 1, t + 1), 0, None)
        return {
            "context": ep.frames[ctx],
            "actions": ep.actions[t : t + self.future],
            "future": ep.frames[t + 1 : t + 1 + self.future],
            "episode_id": ep.episode_id,
            "step": t,
        }


class RewardClips:
    """Item i: ``frames`` uint8 [N,H,W,C] (frames t-N+1..t, clamped at 0) and ``label`` 1.0 when frame t
    shows success (the simulator's flag after action t-1), else 0.0."""

    def __init__(self, dataset: TrajectoryDataset, clip_len: int) -> None:
        if clip_len < 1:
            raise ValueError("clip_len must be >= 1")
        self.dataset, self.clip_len = dataset, clip_len
        self.index = _index(dataset.episodes, lambda e: e.length + 1)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def labels(self) -> Array:
        """float32 [len]: every clip's label, without reading frames twice (for class balancing)."""
        out = np.empty(len(self), np.float32)
        for i, (e, t) in enumerate(self.index):
            out[i] = float(self.dataset.episode(int(e)).frame_success[int(t)])
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        e, t = (int(v) for v in self.index[i])
        ep = self.dataset.episode(e)
        idx = np.clip(np.arange(t - self.clip_len + 1, t + 1), 0, None)
        return {"frames": ep.frames[idx], "label": float(ep.frame_success[t]), "episode_id": ep.episode_id, "step": t}


class PolicySamples:
    """Item i: ``image`` uint8 [H,W,C] and ``proprio`` at step t, ``instruction``, ``actions`` float32 [T,A]
    (actions t..t+T-1, the last action repeated past the episode end) and ``mask`` bool [T] (real actions)."""

    def __init__(self, dataset: TrajectoryDataset, chunk: int) -> None:
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        self.dataset, self.chunk = dataset, chunk
        self.index = _index(dataset.episodes, lambda e: e.length)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        e, t = (int(v) for v in self.index[i])
        ep = self.dataset.episode(e)
        idx = np.arange(t, t + self.chunk)
        return {
            "image": ep.frames[t],
            "proprio": ep.proprio[t],
            "instruction": ep.instruction,
            "actions": ep.actions[np.minimum(idx, ep.length - 1)],
            "mask": idx < ep.length,
            "episode_id": ep.episode_id,
            "step": t,
        }
