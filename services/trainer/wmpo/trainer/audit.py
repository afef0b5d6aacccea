"""The imagination audit: how far imagined episodes agree with the real simulator on the same actions.

An audited episode starts from a simulator reset at a known seed; after it is imagined, its actions are replayed
open-loop in the real simulator from that seed (`wmpo.sim.replay`). One `AuditRecord` per audited episode holds
both outcomes and both frame sequences; `summarize` turns a batch of them into the numbers an iteration reports:

- agreement of "imagined success" with the real success of the same actions (accuracy, precision, recall) and
  how often imagination claims a success the real world does not give ("hallucinated successes");
- the reward model's precision and recall on the policy's own rollouts: its per-frame decisions on the imagined
  frames against the real per-step success of the same actions;
- world-model PSNR/SSIM against the replayed real frames by horizon, next to copy-last-frame (the start frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wmpo.common.tensors import Array
from wmpo.worldmodel.metrics import psnr, ssim
from wmpo.worldmodel.reward.metrics import classification_metrics

HORIZONS = (1, 8, 16, 32)


@dataclass(frozen=True)
class AuditRecord:
    """One imagined episode and the replay of its actions in the real simulator."""

    imagined_success: bool
    real_success: bool
    imagined_frames: Array
    """uint8 [N+1, H, W, C]: the start frame, then one imagined frame per executed action."""
    real_frames: Array
    """uint8 [N+1, H, W, C]: the reset frame, then the real frame after each replayed action."""
    success_probs: Array
    """float32 [N]: the reward model's P(success) for each imagined frame's trailing clip."""
    real_step_success: Array
    """bool [N]: the simulator's success flag after each replayed action."""

    def __post_init__(self) -> None:
        n = len(self.success_probs)
        if self.imagined_frames.shape != self.real_frames.shape or len(self.imagined_frames) != n + 1:
            raise ValueError(
                f"audit record: imagined frames {self.imagined_frames.shape}, real frames {self.real_frames.shape} "
                f"and {n} success probabilities do not describe the same {n} actions"
            )
        if len(self.real_step_success) != n:
            raise ValueError(f"audit record: {len(self.real_step_success)} real success flags for {n} actions")


def success_agreement(imagined: Sequence[bool], real: Sequence[bool]) -> dict[str, float]:
    """Imagined success as a prediction of real success: accuracy, precision, recall, hallucinated successes."""
    pred, truth = np.asarray(imagined, bool), np.asarray(real, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"{len(pred)} imagined outcomes for {len(truth)} real ones")
    n = len(pred)
    tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
    return {
        "audited": float(n),
        "agreement": float((pred == truth).mean()) if n else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "hallucinated_successes": float(fp),
        "hallucinated_success_rate": fp / n if n else float("nan"),
        "imagined_success_rate": float(pred.mean()) if n else float("nan"),
        "real_success_rate": float(truth.mean()) if n else float("nan"),
    }


def fidelity_by_horizon(
    records: Sequence[AuditRecord], horizons: Sequence[int] = HORIZONS
) -> dict[str, dict[int, float]]:
    """Mean PSNR/SSIM of imagined vs real frames `h` actions after the start, and of copy-last-frame (the start
    frame held still) at the same horizons; a horizon no record reaches is left out."""
    scores: dict[str, dict[int, list[float]]] = {k: {} for k in ("psnr", "ssim", "copy_psnr", "copy_ssim")}
    for record in records:
        start = record.real_frames[0]
        for h in horizons:
            if h >= len(record.real_frames):
                continue
            real, imagined = record.real_frames[h], record.imagined_frames[h]
            for key, value in (
                ("psnr", psnr(imagined, real)),
                ("ssim", ssim(imagined, real)),
                ("copy_psnr", psnr(start, real)),
                ("copy_ssim", ssim(start, real)),
            ):
                scores[key].setdefault(h, []).append(value)
    return {key: {h: float(np.mean(v)) for h, v in sorted(per_h.items())} for key, per_h in scores.items()}


def summarize(records: Sequence[AuditRecord], threshold: float, horizons: Sequence[int] = HORIZONS) -> dict[str, Any]:
    """Everything an iteration reports about its audited episodes (flat keys prefixed ``audit_``)."""
    out: dict[str, Any] = {
        f"audit_{k}": v
        for k, v in success_agreement([r.imagined_success for r in records], [r.real_success for r in records]).items()
    }
    if records:
        probs = np.concatenate([r.success_probs for r in records]).astype(np.float64)
        labels = np.concatenate([r.real_step_success for r in records]).astype(bool)
        reward = classification_metrics(probs, labels, threshold)
        out.update({f"audit_reward_{k}": reward[k] for k in ("precision", "recall", "f1", "auroc")})
        for key, per_h in fidelity_by_horizon(records, horizons).items():
            out.update({f"audit_{key}_h{h}": v for h, v in per_h.items()})
    return out
