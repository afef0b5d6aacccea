"""Reward-model training: class-balanced batches of the dataset's reward clips, an episode-level validation split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from wmpo.common.errors import UserError
from wmpo.data.dataset import RewardClips, TrajectoryDataset, split_episodes
from wmpo.worldmodel.reward.checkpoint import load_reward_model, save_reward_model
from wmpo.worldmodel.reward.metrics import evaluate_clips
from wmpo.worldmodel.reward.model import DEFAULT_THRESHOLD, RewardModel


@dataclass
class RewardConfig:
    preset: str = "tiny"
    clip_len: int = 8
    steps: int = 500
    batch_size: int = 16
    lr: float = 3e-4
    val_fraction: float = 0.2
    threshold: float = DEFAULT_THRESHOLD
    seed: int = 0
    device: str = "cpu"
    init: str | None = None  # fine-tune this checkpoint (policy-behaviour alignment) instead of a fresh model


def _clips(clips: RewardClips, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [clips[i] for i in rows]
    frames = torch.from_numpy(np.stack([it["frames"] for it in items]))
    labels = torch.tensor([it["label"] for it in items], dtype=torch.float32)
    return frames, labels


def _split(dataset: TrajectoryDataset, clips: RewardClips, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    val_eps = set(split_episodes(len(dataset), fraction, seed)[1])
    train = [i for i, (e, _t) in enumerate(clips.index) if int(e) not in val_eps]
    val = [i for i, (e, _t) in enumerate(clips.index) if int(e) in val_eps]
    return train, val


def train_reward(
    data: Path, out: Path, config: RewardConfig, *, on_step: Callable[[int, float], None] | None = None
) -> tuple[RewardModel, dict[str, float]]:
    """Fit the classifier on class-balanced batches; returns the model and its held-out metrics."""
    torch.manual_seed(config.seed)
    dataset = TrajectoryDataset(data)
    clips = dataset.reward_clips(config.clip_len)
    if len(clips) == 0:
        raise UserError(f"{data} holds no readable episodes")
    train_rows, val_rows = _split(dataset, clips, config.val_fraction, config.seed)
    labels = clips.labels()
    positives = [r for r in train_rows if labels[r] > 0.5]
    negatives = [r for r in train_rows if labels[r] <= 0.5]
    if not positives or not negatives:
        raise UserError(f"{data}: the reward model needs both success and failure frames (collect successful episodes)")
    image_size = int(dataset.episode(0).frames.shape[1])
    if config.init is not None:
        reward = load_reward_model(config.init, config.device)
        if reward.clip_len != config.clip_len:
            raise UserError(f"{config.init} scores {reward.clip_len}-frame clips, not {config.clip_len}")
    else:
        reward = RewardModel.create(config.preset, image_size, config.clip_len, config.threshold)
    reward.model.to(config.device)  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(reward.model.parameters(), lr=config.lr)
    rng = np.random.default_rng(config.seed)
    half = config.batch_size // 2
    for step in range(1, config.steps + 1):
        reward.model.train()
        rows = rng.choice(positives, size=half).tolist() + rng.choice(negatives, size=config.batch_size - half).tolist()
        frames, target = _clips(clips, rows)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(reward.logits(frames), target.to(reward.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    metrics = evaluate_clips(reward, clips, val_rows or train_rows)
    reward.info.update({"steps": config.steps, "val": metrics, "train_config": asdict(config)})
    save_reward_model(reward, out)
    return reward, metrics
