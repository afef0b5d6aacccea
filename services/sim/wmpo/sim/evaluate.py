"""Real evaluation: success rate with a 95% Wilson interval and mean episode length, plus GIF videos.

The report keeps each seed's outcome (``per_episode``), so two reports on the same seeds can be compared
pairwise (`wmpo.sim.stats.PairedComparison`, `wmpo eval compare`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wmpo.common.media import write_gif
from wmpo.sim.rollout import EpisodeResult, run_many
from wmpo.sim.sources import SourceSpec
from wmpo.sim.stats import wilson_interval
from wmpo.sim.tasks import EVAL_SEED_OFFSET, TaskSpec

__all__ = ["EvalReport", "evaluate", "wilson_interval"]  # wilson_interval lives in stats; kept importable here


@dataclass
class EvalReport:
    """What `wmpo eval` reports."""

    task: str
    policy: str
    episodes: int
    successes: int
    success_rate: float
    ci95_low: float
    ci95_high: float
    mean_length: float
    seeds: list[int]
    per_episode: list[dict[str, Any]] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def outcomes(self) -> dict[int, bool]:
        """``{seed: success}``, the per-seed outcomes a paired comparison needs."""
        return {int(e["seed"]): bool(e["success"]) for e in self.per_episode}


def evaluate(
    task: TaskSpec,
    spec: SourceSpec,
    episodes: int,
    *,
    seed: int = EVAL_SEED_OFFSET,
    workers: int = 1,
    image_size: int = 64,
    camera: str = "corner",
    video_dir: Path | None = None,
    videos: int = 3,
    render: bool = True,
    on_episode: Callable[[EpisodeResult], object] | None = None,
) -> EvalReport:
    """Roll the policy out for `episodes` episodes with seeds ``seed, seed+1, ...`` and summarise."""
    seeds = list(range(seed, seed + episodes))
    keep = seeds[:videos] if video_dir is not None else []
    results: list[EpisodeResult] = []
    for result in run_many(task, spec, seeds, workers=workers, image_size=image_size, camera=camera,
                           render=render or bool(keep), keep_frames_for=keep):  # fmt: skip
        results.append(result)
        if on_episode is not None:
            on_episode(result)
    results.sort(key=lambda r: r.seed)
    successes = sum(r.success for r in results)
    low, high = wilson_interval(successes, len(results))
    paths = []
    if video_dir is not None:
        video_dir.mkdir(parents=True, exist_ok=True)
        for r in results:
            if r.frames is not None:
                path = video_dir / f"{task.name}-seed{r.seed}-{'success' if r.success else 'failure'}.gif"
                write_gif(r.frames, path)
                paths.append(str(path))
    return EvalReport(
        task=task.name,
        policy=results[0].source if results else spec.source,
        episodes=len(results),
        successes=successes,
        success_rate=successes / len(results) if results else 0.0,
        ci95_low=low,
        ci95_high=high,
        mean_length=float(np.mean([r.length for r in results])) if results else 0.0,
        seeds=seeds,
        per_episode=[{"seed": r.seed, "success": r.success, "length": r.length} for r in results],
        videos=paths,
    )
