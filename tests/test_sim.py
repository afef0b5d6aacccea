"""The real simulator (MetaWorld/MuJoCo, rendered offscreen), data collection and evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wmpo.common.errors import UserError
from wmpo.data import TrajectoryDataset
from wmpo.sim.env import MetaWorldEnv
from wmpo.sim.evaluate import evaluate, wilson_interval
from wmpo.sim.sources import SourceSpec
from wmpo.sim.tasks import TASKS, get_task

WMPO = [sys.executable, "-m", "wmpo.common.cli"]


def test_env_renders_upright_frames_and_is_seeded() -> None:
    with MetaWorldEnv("drawer-open", image_size=48) as env:
        first = env.reset(seed=3)
        assert first.image.shape == (48, 48, 3) and first.image.dtype == np.uint8
        assert first.proprio.shape == (4,) and first.proprio.dtype == np.float32
        assert first.instruction == "open the drawer"
        assert first.image.std() > 10  # a rendered scene, not a blank frame
        step = env.step(np.zeros(4, np.float32))
        assert not step.success and not step.done
        again = env.reset(seed=3)  # the same start state (the arm settles to within a few mm)
        current = np.r_[0:18, 36:39]  # MetaWorld's state also holds the previous step's poses (18:36)
        np.testing.assert_allclose(again.state[current], first.state[current], atol=5e-3)
        assert np.abs(again.image.astype(int) - first.image.astype(int)).mean() < 1.0
        other = env.reset(seed=4)
        assert not np.array_equal(other.state, first.state)  # another seed, another start state
    # The floor (table) is in the lower half of an upright image: brighter/darker split is stable.
    assert first.image[:8].mean() != first.image[-8:].mean()


@pytest.mark.parametrize("task", ["button-press", "reach"])
def test_expert_succeeds_and_random_fails(task: str) -> None:
    spec = get_task(task)
    expert = evaluate(spec, SourceSpec("expert"), 8, render=False)
    random = evaluate(spec, SourceSpec("random"), 8, render=False)
    assert expert.success_rate >= 0.9, expert
    assert random.success_rate <= 0.1, random
    assert expert.mean_length < spec.max_steps and random.mean_length == spec.max_steps


def test_collect_cli_writes_a_readable_dataset(tmp_path: Path) -> None:
    out = tmp_path / "data"
    cmd = [*WMPO, "data", "collect", "--task", "button-press", "--episodes", "2", "--out", str(out), "--workers", "2"]
    subprocess.run(cmd, check=True, capture_output=True)
    subprocess.run([*cmd[:-2], "--seed", "100", "--noise", "0.5", "--workers", "1"], check=True, capture_output=True)
    info = json.loads(
        subprocess.run([*WMPO, "data", "info", str(out), "--json"], check=True, capture_output=True).stdout
    )
    assert info["episodes"] == 4 and info["tasks"] == {"button-press": 4} and not info["problems"]
    assert info["sources"] == {"expert": 2, "expert+noise0.5": 2}
    dataset = TrajectoryDataset(out)
    episode = dataset.episode(0)
    assert episode.frames.shape[1:] == (64, 64, 3) and episode.actions.shape[1] == 4
    first = episode.first_success_step
    assert episode.success and first is not None and episode.length == first + 1 + 8  # 8 steps recorded after success
    window = dataset.world_model_windows(4, 8)[0]
    assert window["context"].shape == (4, 64, 64, 3) and window["future"].shape == (8, 64, 64, 3)


def test_eval_cli_reports_json_and_videos(tmp_path: Path) -> None:
    result = subprocess.run(
        [*WMPO, "eval", "--policy", "expert", "--task", "reach", "--episodes", "2", "--json", "--video", str(tmp_path),
         "--videos", "1", "--workers", "1"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert report["episodes"] == 2 and report["seeds"] == [1_000_000, 1_000_001]
    assert 0 <= report["ci95_low"] <= report["success_rate"] <= report["ci95_high"] <= 1
    assert len(report["videos"]) == 1 and Path(report["videos"][0]).stat().st_size > 1000


def test_bad_inputs_are_one_line_and_exit_2(tmp_path: Path) -> None:
    for args, message in [
        (["eval", "--policy", "expert", "--task", "fly"], "unknown task 'fly'; known tasks: "),
        (["eval", "--policy", "nowhere", "--task", "reach"], "is neither expert, random"),
        (["data", "info", str(tmp_path / "missing")], "is not a dataset folder"),
        (["data", "collect", "--task", "reach", "--episodes", "1", "--out", str(tmp_path), "--seed", "999999",
          "--episodes", "5"], "reserved for evaluation"),
    ]:  # fmt: skip
        result = subprocess.run([*WMPO, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr


def test_wilson_interval_and_tasks() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and 0.72 < low < 0.73
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(1 - high)
    assert len(TASKS) >= 3 and all(t.instruction for t in TASKS.values())
    with pytest.raises(UserError, match="unknown task"):
        get_task("nope")
