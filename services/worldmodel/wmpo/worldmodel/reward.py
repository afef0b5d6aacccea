"""The reward model: a VideoMAE success classifier (from `transformers`) over the last N frames.

`train_reward` fits it on the dataset's reward clips (class-balanced batches, episode-level validation
split); `evaluate_reward` reports accuracy, precision, recall, F1 and AUROC on held-out clips. The success
threshold (0.96 by default) is saved with the checkpoint (``wmpo_reward.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification

from wmpo.common.errors import UserError
from wmpo.common.fsutil import atomic_directory
from wmpo.common.tensors import Array
from wmpo.data.dataset import RewardClips, TrajectoryDataset, split_episodes

MARKER_FILE = "wmpo_reward.json"
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.2M parameters: ~0.4 s per batch-16 forward on 2 CPU cores (DESIGN.md §7).
    "tiny": {"patch_size": 8, "tubelet_size": 2, "hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 192},
    "base": {"patch_size": 16, "tubelet_size": 2, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
             "intermediate_size": 1536},
}  # fmt: skip


@dataclass
class RewardConfig:
    preset: str = "tiny"
    clip_len: int = 8
    steps: int = 500
    batch_size: int = 16
    lr: float = 3e-4
    val_fraction: float = 0.2
    threshold: float = 0.96
    seed: int = 0
    device: str = "cpu"
    init: str | None = None  # fine-tune this checkpoint (policy-behaviour alignment) instead of a fresh model


class RewardModel:
    """A VideoMAE classifier returning P(success) for clips of `clip_len` frames."""

    def __init__(self, model: VideoMAEForVideoClassification, threshold: float, info: dict[str, Any] | None = None):
        self.model = model
        self.threshold = threshold
        self.info = info or {}
        config: Any = model.config
        self.clip_len = int(config.num_frames)
        self.image_size = int(config.image_size)

    @classmethod
    def create(cls, preset: str, image_size: int, clip_len: int, threshold: float = 0.96) -> RewardModel:
        if preset not in PRESETS:
            raise ValueError(f"unknown reward config {preset!r}; choose one of {', '.join(PRESETS)}")
        options: dict[str, Any] = {"image_size": image_size, "num_frames": clip_len, "num_labels": 1, "num_channels": 3,
                                   "use_mean_pooling": True, **PRESETS[preset]}  # fmt: skip
        config = VideoMAEConfig(**options)
        return cls(VideoMAEForVideoClassification(config), threshold, {"preset": preset})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, clips: torch.Tensor) -> torch.Tensor:
        """clips uint8 [B, N, H, W, C] -> logits [B]."""
        pixels = clips.to(self.device).movedim(-1, -3).float().div(127.5).sub(1.0)
        out: torch.Tensor = self.model(pixel_values=pixels).logits[:, 0]
        return out

    @torch.no_grad()
    def probability(self, clips: Array) -> Array:
        """P(success) [B] for uint8 clips [B, N, H, W, C]."""
        self.model.eval()
        return torch.sigmoid(self.logits(torch.from_numpy(np.ascontiguousarray(clips)))).cpu().numpy()

    def save(self, path: Path) -> Path:
        with atomic_directory(path) as tmp:
            self.model.save_pretrained(str(tmp))
            marker = {"format": "wmpo-reward", "threshold": self.threshold, **self.info}
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: Path | str, device: str = "cpu") -> RewardModel:
        root = Path(path)
        marker = root / MARKER_FILE
        if not marker.is_file():
            raise UserError(f"{root} is not a wmpo reward-model checkpoint (no {MARKER_FILE})")
        info = json.loads(marker.read_text())
        model = VideoMAEForVideoClassification.from_pretrained(str(root), local_files_only=True)
        model.to(device).eval()  # type: ignore[arg-type]
        return cls(model, float(info.get("threshold", 0.96)), info)


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
        reward = RewardModel.load(config.init, config.device)
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
    reward.save(out)
    return reward, metrics


def evaluate_clips(reward: RewardModel, clips: RewardClips, rows: list[int], batch: int = 32) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (at the model's threshold) and AUROC over the given clips."""
    probs, labels = [], []
    for i in range(0, len(rows), batch):
        frames, target = _clips(clips, rows[i : i + batch])
        probs.append(reward.probability(frames.numpy()))
        labels.append(target.numpy())
    p, y = np.concatenate(probs), np.concatenate(labels) > 0.5
    return classification_metrics(p, y, reward.threshold)


def classification_metrics(probs: Array, labels: Array, threshold: float) -> dict[str, float]:
    """Binary metrics of probabilities against boolean labels."""
    pred = probs >= threshold
    tp, fp = int((pred & labels).sum()), int((pred & ~labels).sum())
    fn, tn = int((~pred & labels).sum()), int((~pred & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "clips": float(len(labels)),
        "positives": float(labels.sum()),
        "accuracy": (tp + tn) / max(1, len(labels)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auroc": auroc(probs, labels),
        "threshold": threshold,
    }


def calibrate_threshold(probs: Array, labels: Array, low: float = 0.5, high: float = 0.99) -> float | None:
    """The success threshold in [low, high] with the best F1 on labelled clips (ties: the higher one).

    The paper sets a threshold per task (0.62-0.96); this picks one from held-out clips. None without
    positive clips.
    """
    labels = np.asarray(labels, bool)
    if not labels.any():
        return None
    candidates = np.unique(np.clip(np.concatenate([probs, [low, high]]), low, high))
    scored = [(classification_metrics(probs, labels, float(t))["f1"], float(t)) for t in candidates]
    return max(scored)[1]


def auroc(scores: Array, labels: Array) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties halved); NaN when one class is absent."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))
