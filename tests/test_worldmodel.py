"""The world model, fidelity metrics and the reward model, on small real data from the simulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wmpo.data import TrajectoryDataset
from wmpo.worldmodel.checkpoint import load_world_model, save_world_model
from wmpo.worldmodel.metrics import evaluate_fidelity, psnr, ssim
from wmpo.worldmodel.model import make_world_model
from wmpo.worldmodel.reward.checkpoint import load_reward_model
from wmpo.worldmodel.reward.metrics import auroc, classification_metrics
from wmpo.worldmodel.reward.train import RewardConfig, train_reward
from wmpo.worldmodel.train import WMTrainConfig, train_world_model


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two expert `reach` episodes and two random (failed) ones at 32x32."""
    from wmpo.sim.rollout import run_many
    from wmpo.sim.sources import SourceSpec
    from wmpo.sim.tasks import get_task

    root = tmp_path_factory.mktemp("wm") / "data"
    task = get_task("reach")
    list(run_many(task, SourceSpec("expert"), range(2), image_size=32, out_dir=root, steps_after_success=4))
    list(run_many(task, SourceSpec("random"), range(10, 12), image_size=32, out_dir=root, max_steps=40))
    return root


def test_save_load_gives_identical_samples_for_a_seed(tmp_path: Path) -> None:
    model = make_world_model("tiny", image_size=32).eval()
    context = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    actions = torch.rand(2, 8, 4) * 2 - 1
    first = model.sample(context, actions, generator=torch.Generator().manual_seed(3))
    save_world_model(model, tmp_path / "wm", {"steps": 0})
    loaded, info = load_world_model(tmp_path / "wm")
    again = loaded.sample(context, actions, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and info["format"] == "wmpo-worldmodel"
    assert first.shape == (2, 8, 3, 32, 32) and first.min() >= -1 and first.max() <= 1
    per_row = [torch.Generator().manual_seed(s) for s in (3, 4)]
    alone = loaded.sample(context[1:], actions[1:], generator=[torch.Generator().manual_seed(4)])
    torch.testing.assert_close(loaded.sample(context, actions, generator=per_row)[1:], alone)


def test_training_lowers_the_loss_and_beats_copy_last_frame(small_data: Path, tmp_path: Path) -> None:
    one_episode = tmp_path / "expert"  # a few hundred steps fit one episode's ~45 windows
    first = next(Path(e.path) for e in TrajectoryDataset(small_data).episodes if e.source == "expert")
    (one_episode / "episodes").mkdir(parents=True)
    (one_episode / "episodes" / first.name).symlink_to(first)
    config = WMTrainConfig(
        steps=500, eval_every=250, batch_size=8, lr=2e-3, warmup_steps=20, val_fraction=0.0, sampler_steps=2
    )
    losses: list[float] = []
    result = train_world_model(one_episode, tmp_path / "wm", config, on_step=lambda _s, loss, _r: losses.append(loss))
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    last = result.evals[-1]
    assert last["mse_h1"] < last["copy_last_mse_h1"], result.evals
    resumed = train_world_model(one_episode, tmp_path / "wm", WMTrainConfig(**{**config.__dict__, "steps": 510}))
    assert resumed.steps == 510 and len(resumed.evals) == len(result.evals) + 1


def test_fidelity_metrics_and_report(small_data: Path, tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert psnr(image, image) == 100.0 and ssim(image, image) == pytest.approx(1.0)
    noisy = np.clip(image.astype(int) + 40, 0, 255).astype(np.uint8)
    assert psnr(noisy, image) < 25 and ssim(noisy, image) < 1.0
    model = make_world_model("tiny", image_size=32).eval()
    episodes = [TrajectoryDataset(small_data).episode(0)]
    report = evaluate_fidelity(model, episodes, horizons=(1, 8, 16), video_dir=tmp_path, videos=1)
    assert set(report.psnr) == {1, 8, 16} and all(np.isfinite(v) for v in report.copy_psnr.values())
    assert len(report.videos) == 1 and Path(report.videos[0]).stat().st_size > 1000


def test_reward_model_separates_success_from_failure(small_data: Path, tmp_path: Path) -> None:
    config = RewardConfig(steps=120, batch_size=16, lr=1e-3, val_fraction=0.0, threshold=0.5)
    reward, metrics = train_reward(small_data, tmp_path / "reward", config)
    assert metrics["auroc"] > 0.9, metrics
    loaded = load_reward_model(tmp_path / "reward")
    assert loaded.threshold == 0.5 and loaded.clip_len == 8
    clips = TrajectoryDataset(small_data).reward_clips(8)
    np.testing.assert_allclose(
        loaded.probability(clips[5]["frames"][None]), reward.probability(clips[5]["frames"][None])
    )


def test_classification_metrics_by_hand() -> None:
    probs = np.array([0.99, 0.97, 0.5, 0.2, 0.98])
    labels = np.array([True, True, True, False, False])
    m = classification_metrics(probs, labels, 0.96)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert auroc(np.array([0.9, 0.8, 0.1]), np.array([True, False, False])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
