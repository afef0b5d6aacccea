"""Reward-model metrics: accuracy, precision, recall, F1 and AUROC on labelled clips; threshold calibration."""

from __future__ import annotations

import numpy as np

from wmpo.common.tensors import Array
from wmpo.data.dataset import RewardClips
from wmpo.worldmodel.reward.model import RewardModel


def evaluate_clips(reward: RewardModel, clips: RewardClips, rows: list[int], batch: int = 32) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (at the model's threshold) and AUROC over the given clips."""
    probs, labels = [], []
    for i in range(0, len(rows), batch):
        items = [clips[r] for r in rows[i : i + batch]]
        probs.append(reward.probability(np.stack([it["frames"] for it in items])))
        labels.append(np.array([it["label"] for it in items], np.float32))
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
