"""Simulator data collection throughput: 1 worker process vs N, side by side on the same seeds.

.venv/bin/python bench/bench_collect.py --task button-press --episodes 12 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from wmpo.data import TrajectoryDataset
from wmpo.sim.rollout import run_many
from wmpo.sim.sources import SourceSpec
from wmpo.sim.tasks import get_task


def measure(task: str, episodes: int, workers: int, image_size: int) -> tuple[float, int]:
    """Seconds (process start-up included) and recorded steps to collect `episodes` expert episodes."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        list(run_many(get_task(task), SourceSpec("expert"), range(episodes), workers=workers,
                      image_size=image_size, out_dir=Path(tmp), steps_after_success=8))  # fmt: skip
        elapsed = time.perf_counter() - start
        steps = TrajectoryDataset(tmp, verify=False).summary().steps
    return elapsed, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="button-press")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    one_s, steps = measure(args.task, args.episodes, 1, args.image_size)
    many_s, _ = measure(args.task, args.episodes, args.workers, args.image_size)
    print(f"task {args.task}, {args.episodes} expert episodes, {steps} steps, {args.image_size}px frames")
    print(f"1 worker:  {one_s:6.1f} s  {steps / one_s:6.1f} steps/s (rendered, written)")
    print(f"{args.workers} workers: {many_s:6.1f} s  {steps / many_s:6.1f} steps/s")
    print(f"speed-up {one_s / many_s:.2f}x")


if __name__ == "__main__":
    main()
