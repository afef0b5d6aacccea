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
from wmpo.sim.evaluate import evaluate
from wmpo.sim.replay import replay_actions
from wmpo.sim.rollout import run_episode
from wmpo.sim.sources import SourceSpec, build_source
from wmpo.sim.stats import (
    PairedComparison,
    mcnemar_exact,
    outcomes_from_report,
    paired_difference_interval,
    wilson_interval,
)
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
    # The report keeps every seed's outcome, so two reports can be compared pairwise.
    assert outcomes_from_report(report) == {e["seed"]: e["success"] for e in report["per_episode"]}
    assert sorted(outcomes_from_report(report)) == report["seeds"]
    path = tmp_path / "reach.json"
    path.write_text(result.stdout)
    compare = subprocess.run(
        [*WMPO, "eval", "compare", str(path), str(path)], check=True, capture_output=True, text=True
    )
    assert "reach: 2 paired episodes" in compare.stdout and "exact McNemar p = 1" in compare.stdout


def _eval_report(path: Path, outcomes: dict[int, bool], task: str = "reach", policy: str = "expert") -> Path:
    """A minimal `wmpo eval --json` report with these per-seed outcomes."""
    per_episode = [{"seed": s, "success": ok, "length": 10} for s, ok in outcomes.items()]
    path.write_text(json.dumps({"task": task, "policy": policy, "seeds": list(outcomes), "per_episode": per_episode}))
    return path


def test_bad_inputs_are_one_line_and_exit_2(tmp_path: Path) -> None:
    a = _eval_report(tmp_path / "a.json", {1_000_000: True, 1_000_001: False})
    b = _eval_report(tmp_path / "b.json", {1_000_000: True, 1_000_002: False})
    other_task = _eval_report(tmp_path / "c.json", {1_000_000: True, 1_000_001: False}, task="push")
    (tmp_path / "data.json").write_text(json.dumps({"episodes": 3}))
    for args, message in [
        (["eval", "--policy", "expert", "--task", "fly"], "unknown task 'fly'; known tasks: "),
        (["eval", "--policy", "nowhere", "--task", "reach"], "is neither expert, random"),
        (["data", "info", str(tmp_path / "missing")], "is not a dataset folder"),
        (["data", "collect", "--task", "reach", "--episodes", "1", "--out", str(tmp_path), "--seed", "999999",
          "--episodes", "5"], "reserved for evaluation"),
        (["eval", "compare", str(a), str(b)], "needs the same seeds in both evaluations, but 1 seed (1000001) only in"),
        (["eval", "compare", str(a), str(tmp_path / "data.json")], "is not a `wmpo eval` report"),
        (["eval", "compare", str(a), str(tmp_path / "nothing.json")], "no such file"),
        (["eval", "compare", str(a), str(other_task)], "a paired comparison needs the same task"),
    ]:  # fmt: skip
        result = subprocess.run([*WMPO, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    # `wmpo eval` still needs --policy and --task to evaluate (a usage error, as before the compare sub-command).
    for args, missing in [([], "--policy"), (["--policy", "expert"], "--task")]:
        result = subprocess.run([*WMPO, "eval", *args], capture_output=True, text=True, check=False)
        assert result.returncode == 2 and f"Missing option '{missing}'" in result.stderr, result.stderr


def test_wilson_interval_and_tasks() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and 0.72 < low < 0.73
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(1 - high)
    assert len(TASKS) >= 3 and all(t.instruction for t in TASKS.values())
    with pytest.raises(UserError, match="unknown task"):
        get_task("nope")


def test_wilson_interval_known_values() -> None:
    # Newcombe (1998), Two-sided confidence intervals for the single proportion, Stat Med 17:857-872, Table I.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)
    assert wilson_interval(1, 29) == pytest.approx((0.0061, 0.1718), abs=5e-5)


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(1, 9) == mcnemar_exact(9, 1) == 22 / 1024  # 2 * P[Bin(10, 1/2) <= 1] = 0.021484375
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pairs: no evidence either way
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 5) == 2 / 32
    assert mcnemar_exact(12, 2) == pytest.approx(2 * (1 + 14 + 91) / 2**14)
    assert 0 < mcnemar_exact(400, 600) < 1e-9  # exact integers: no overflow or underflow at large n
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact(-1, 3)


def test_newcombe_paired_difference_interval_known_values() -> None:
    # Newcombe (1998), Improved confidence intervals for the difference between binomial proportions based on
    # paired data, Stat Med 17:2635-2650: his example (a, b, c, d) = (20, 12, 2, 16), method 10.
    assert paired_difference_interval(20, 12, 2, 16) == pytest.approx((0.0562, 0.3292), abs=5e-5)
    # Fagerland, Lydersen, Laake (2014), Stat Med 33:2850-2875 (Newcombe's method 10): (1, 1, 7, 12).
    assert paired_difference_interval(1, 1, 7, 12) == pytest.approx((-0.507, -0.026), abs=5e-4)
    # Tang, Li, Tang (2010) example as reproduced by the ratesci R package: (8, 3, 1, 2).
    assert paired_difference_interval(8, 3, 1, 2) == pytest.approx((-0.1574, 0.4136), abs=5e-5)
    # Swapping the arms mirrors the interval.
    low, high = paired_difference_interval(20, 2, 12, 16)
    assert (low, high) == pytest.approx((-0.3292, -0.0562), abs=5e-5)
    # Degenerate tables: nothing known; both arms identical (phi 0, an empty margin); one arm always wins.
    assert paired_difference_interval(0, 0, 0, 0) == (-1.0, 1.0)
    low, high = paired_difference_interval(10, 0, 0, 0)
    assert low < 0 < high and low == pytest.approx(-high)
    low, high = paired_difference_interval(0, 10, 0, 0)
    assert high == 1.0 and 0.5 < low < 1.0
    low, high = paired_difference_interval(0, 0, 10, 0)
    assert low == -1.0 and -1.0 < high < -0.5
    for table in [(3, 0, 0, 7), (0, 4, 6, 0), (5, 5, 0, 0), (1, 0, 1, 0)]:
        low, high = paired_difference_interval(*table)
        d = (table[1] - table[2]) / sum(table)
        assert -1.0 <= low <= d <= high <= 1.0, table


def test_paired_comparison_from_per_seed_outcomes() -> None:
    # Newcombe's table as seed outcomes: 20 seeds both solve, 12 only A, 2 only B, 16 neither.
    kinds = [(True, True)] * 20 + [(True, False)] * 12 + [(False, True)] * 2 + [(False, False)] * 16
    seeds = list(range(1_000_000, 1_000_050))
    a = [(s, x) for s, (x, _) in zip(seeds, kinds, strict=True)]
    b = {s: y for s, (_, y) in zip(reversed(seeds), reversed(kinds), strict=True)}  # any order, a mapping
    cmp = PairedComparison.from_outcomes(a, b)
    assert (cmp.n, cmp.both, cmp.b, cmp.c, cmp.neither) == (50, 20, 12, 2, 16)
    assert (cmp.successes_a, cmp.successes_b) == (32, 22)
    assert cmp.rate_a == 0.64 and cmp.rate_b == 0.44 and cmp.difference == pytest.approx(0.2)
    assert cmp.ci_a == wilson_interval(32, 50) and cmp.ci_b == wilson_interval(22, 50)
    assert cmp.ci_difference == pytest.approx((0.0562, 0.3292), abs=5e-5)
    assert cmp.p_value == mcnemar_exact(12, 2)
    assert json.loads(json.dumps(cmp.as_dict()))["ci_difference"] == list(cmp.ci_difference)
    with pytest.raises(ValueError, match=r"same seeds .* 1 seed \(1000050\) only in B"):
        PairedComparison.from_outcomes(a, [*b.items(), (1_000_050, True)])
    with pytest.raises(ValueError, match=r"2 seeds \(1000000, 1000001\) only in A"):
        PairedComparison.from_outcomes(a, {s: v for s, v in b.items() if s > 1_000_001})
    with pytest.raises(ValueError, match="seed 1000000 more than once"):
        PairedComparison.from_outcomes([*a, (1_000_000, False)], b)
    empty = PairedComparison.from_outcomes([], {})
    assert empty.n == 0 and empty.ci_difference == (-1.0, 1.0) and empty.p_value == 1.0
    with pytest.raises(ValueError, match="not a `wmpo eval` report"):
        outcomes_from_report({"per_episode": [{"seed": 1}]})


def test_eval_compare_cli_prints_paired_statistics(tmp_path: Path) -> None:
    seeds = range(1_000_000, 1_000_010)
    a = _eval_report(tmp_path / "a.json", {s: s == 1_000_009 for s in seeds}, policy="random")  # 1/10
    b = _eval_report(tmp_path / "b.json", {s: s != 1_000_009 for s in seeds})  # 9/10, so b = 1, c = 9
    out = subprocess.run([*WMPO, "eval", "compare", str(a), str(b), "--json"], check=True, capture_output=True)
    result = json.loads(out.stdout)
    assert (
        result["task"] == "reach" and result["report_a"]["policy"] == "random" and result["report_b"]["file"] == str(b)
    )
    assert (result["n"], result["b"], result["c"]) == (10, 1, 9)
    assert result["p_value"] == pytest.approx(0.021484375) and result["difference"] == pytest.approx(-0.8)
    assert result["ci_difference"] == pytest.approx(list(paired_difference_interval(0, 1, 9, 0)))
    text = subprocess.run([*WMPO, "eval", "compare", str(a), str(b)], check=True, capture_output=True, text=True)
    lines = text.stdout.splitlines()
    assert lines[0] == "reach: 10 paired episodes (seeds 1000000-1000009)"
    assert lines[1].startswith("A  random (") and "1/10 = 10.0% (95% Wilson CI" in lines[1]
    assert lines[2].startswith("B  expert (") and "9/10 = 90.0%" in lines[2]
    assert lines[3].startswith("A - B  -80.0% (95% Newcombe CI") and "exact McNemar p = 0.02148" in lines[3]


def test_replay_actions_reproduces_the_simulator() -> None:
    task, seed, size = get_task("button-press"), 7, 32
    actions = np.random.default_rng(0).uniform(-1, 1, size=(12, 4)).astype(np.float32)
    frames, success, first = replay_actions(task, seed, actions, image_size=size, camera="corner")
    assert frames.shape == (13, size, size, 3) and frames.dtype == np.uint8
    assert success.shape == (12,) and success.dtype == bool and first is None and not success.any()
    again = replay_actions(task.name, seed, actions, image_size=size, camera="corner")
    np.testing.assert_array_equal(again.frames, frames)  # the same seed and actions: the same real frames
    np.testing.assert_array_equal(again.success, success)
    assert not np.array_equal(frames[0], frames[-1])  # the arm moved
    with MetaWorldEnv(task, image_size=size, camera="corner") as env:
        np.testing.assert_array_equal(frames[0], env.reset(seed).image)  # the start frame is the reset frame
    # The scripted expert's episode, recorded by a rollout and replayed open-loop, happens again exactly.
    with MetaWorldEnv(task, image_size=size, camera="corner") as env:
        episode, _length = run_episode(env, build_source(SourceSpec("expert")), seed)
    assert episode.success
    replay = replay_actions(task, seed, episode.actions, image_size=size, camera="corner")
    np.testing.assert_array_equal(replay.frames, episode.frames)
    np.testing.assert_array_equal(replay.success, episode.step_success)
    assert replay.first_success == episode.first_success_step and replay.solved
    # stop_at_success ends at the first success (here the last recorded action, as run_episode stops there).
    longer = np.concatenate([episode.actions, np.zeros((5, 4), np.float32)])
    stopped = replay_actions(task, seed, longer, image_size=size, camera="corner", stop_at_success=True)
    assert stopped.first_success == episode.first_success_step and len(stopped.success) == episode.length
    np.testing.assert_array_equal(stopped.frames, episode.frames)
    with pytest.raises(ValueError, match=r"actions must be \[N, 4\]"):
        replay_actions(task, seed, np.zeros(4), image_size=size)
