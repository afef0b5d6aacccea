"""The trajectory format and dataset views, on synthetic episodes whose values encode their indices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from wmpo.data import CorruptEpisodeError, Episode, EpisodeStore, TrajectoryDataset


def make_episode(length: int = 12, success_at: int | None = 9, task: str = "reach", size: int = 8) -> Episode:
    """Frame t is filled with value t; action t is (t/100, ...); proprio t is (t, ...)."""
    values = np.arange(length + 1, dtype=np.uint8)[:, None, None, None]
    frames = np.broadcast_to(values, (length + 1, size, size, 3))
    actions = np.tile((np.arange(length, dtype=np.float32) / 100)[:, None], (1, 4))
    success = np.zeros(length, bool)
    if success_at is not None:
        success[success_at:] = True
    return Episode(
        frames=np.ascontiguousarray(frames),
        actions=actions,
        proprio=np.tile(np.arange(length + 1, dtype=np.float32)[:, None], (1, 4)),
        step_success=success,
        instruction="reach the red goal",
        task=task,
        source="expert",
        seed=7,
    )


def test_write_read_round_trip_is_exact(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path)
    episode = make_episode()
    path = store.write(episode)
    assert path.parent == tmp_path / "episodes" and episode.episode_id in path.name
    back = store.read(path)
    for name in ("frames", "actions", "proprio", "step_success"):
        np.testing.assert_array_equal(getattr(back, name), getattr(episode, name))
    assert (back.instruction, back.task, back.source, back.seed, back.camera) == (
        "reach the red goal", "reach", "expert", 7, "corner",
    )  # fmt: skip
    assert back.first_success_step == 9 and back.success
    with h5py.File(path) as f:  # robomimic's keys
        assert f["data/demo_0/actions"].shape == (12, 4)
        assert f["data/demo_0/obs/corner_image"].shape == (13, 8, 8, 3)
        assert f["data/demo_0/rewards"][9] == 1.0 and f["data/demo_0/dones"][-1] == 1
    assert not list((tmp_path / "episodes").glob(".*tmp")), "no temporary file left behind"


def test_invalid_episodes_are_refused_before_writing(tmp_path: Path) -> None:
    episode = make_episode()
    episode.actions = episode.actions * 300
    with pytest.raises(ValueError, match=r"actions must lie in \[-1, 1\]"):
        EpisodeStore(tmp_path).write(episode)
    short = make_episode()
    short.frames = short.frames[:-1]
    with pytest.raises(ValueError, match="12 frames for 12 actions"):
        EpisodeStore(tmp_path).write(short)
    assert EpisodeStore(tmp_path).paths() == []


def test_parallel_writers_append_to_one_dataset(tmp_path: Path) -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_data import make_episode; "
        f"from wmpo.data import EpisodeStore; s = EpisodeStore({str(tmp_path)!r}); "
        "[s.write(make_episode()) for _ in range(5)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert all(p.wait() == 0 for p in procs)
    dataset = TrajectoryDataset(tmp_path)
    assert len(dataset) == 15 and not dataset.problems


def test_world_model_windows_align_frames_with_actions(tmp_path: Path) -> None:
    EpisodeStore(tmp_path).write(make_episode(length=12))
    windows = TrajectoryDataset(tmp_path).world_model_windows(context=4, future=8)
    assert len(windows) == 12 - 8 + 1
    first = windows[0]
    assert first["context"].shape == (4, 8, 8, 3) and first["future"].shape == (8, 8, 8, 3)
    assert first["actions"].shape == (8, 4)
    assert list(first["context"][:, 0, 0, 0]) == [0, 0, 0, 0]  # the first frame repeated at the start
    w = windows[3]  # t = 3
    assert list(w["context"][:, 0, 0, 0]) == [0, 1, 2, 3]
    assert list(w["future"][:, 0, 0, 0]) == [4, 5, 6, 7, 8, 9, 10, 11]
    np.testing.assert_allclose(w["actions"][:, 0], np.arange(3, 11) / 100)  # action t+j leads to frame t+j+1
    last = windows[len(windows) - 1]
    assert last["future"][-1, 0, 0, 0] == 12


def test_reward_clips_policy_samples_and_start_states(tmp_path: Path) -> None:
    EpisodeStore(tmp_path).write(make_episode(length=12, success_at=9))
    EpisodeStore(tmp_path).write(make_episode(length=5, success_at=None, task="push"))
    dataset = TrajectoryDataset(tmp_path)
    clips = dataset.reward_clips(clip_len=4)
    assert len(clips) == 13 + 6
    labels = clips.labels()
    assert labels.sum() == 3  # frames 10, 11 and 12 of the first episode show success
    clip = clips[10]
    assert list(clip["frames"][:, 0, 0, 0]) == [7, 8, 9, 10] and clip["label"] == 1.0
    assert clips[9]["label"] == 0.0
    samples = dataset.policy_samples(chunk=8)
    assert len(samples) == 12 + 5
    s = samples[12 + 2]  # the second episode, step 2 (length 5): actions 2, 3, 4 then padding
    assert s["image"].shape == (8, 8, 3) and s["image"][0, 0, 0] == 2 and s["proprio"][0] == 2
    assert list(s["mask"]) == [True, True, True, False, False, False, False, False]
    np.testing.assert_allclose(s["actions"][:, 0], [0.02, 0.03, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04])
    starts = dataset.start_states()
    assert len(starts) == 10 + 5  # frames 0..9 before success; frames 0..4 of the failure
    ep_id, step = starts[3]
    assert list(dataset.context_frames(ep_id, step, 4)[:, 0, 0, 0]) == [0, 1, 2, 3]
    summary = dataset.summary()
    assert (summary.episodes, summary.steps, summary.successes, summary.tasks) == (2, 17, 1, {"reach": 1, "push": 1})


def test_corrupted_and_truncated_files_are_reported_and_skipped(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path)
    good = store.write(make_episode())
    truncated = store.write(make_episode())
    corrupted = store.write(make_episode(size=32))
    not_hdf5 = tmp_path / "episodes" / "ep-zzz.hdf5"
    not_hdf5.write_bytes(b"hello")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with h5py.File(corrupted) as f:
        chunk = f["data/demo_0/obs/corner_image"].id.get_chunk_info(5)  # frame 5's stored bytes
    raw = bytearray(corrupted.read_bytes())
    raw[chunk.byte_offset + 4 : chunk.byte_offset + 24] = bytes(
        range(20)
    )  # overwrite stored frame bytes: checksum must catch it
    corrupted.write_bytes(bytes(raw))
    dataset = TrajectoryDataset(tmp_path)
    assert [e.path for e in dataset.episodes] == [str(good)]
    reasons = dict(dataset.problems)
    assert "truncated" in reasons[str(truncated)]
    assert "checksum" in reasons[str(corrupted)] or "corrupt" in reasons[str(corrupted)]
    assert "truncated or not an HDF5 file" in reasons[str(not_hdf5)]
    with pytest.raises(CorruptEpisodeError, match=str(truncated.name)):
        store.read(truncated)
    result = subprocess.run(
        [sys.executable, "-m", "wmpo.common.cli", "data", "info", str(tmp_path)], capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    assert "episodes  1" in result.stdout
    assert result.stdout.count("skipped") == 3
