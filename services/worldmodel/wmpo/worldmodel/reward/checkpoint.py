"""Reward-model checkpoint directories: `save_pretrained` weights and config plus ``wmpo_reward.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import VideoMAEForVideoClassification

from wmpo.common.errors import UserError
from wmpo.common.fsutil import atomic_directory
from wmpo.worldmodel.reward.model import DEFAULT_THRESHOLD, RewardModel

MARKER_FILE = "wmpo_reward.json"


def save_reward_model(reward: RewardModel, path: Path) -> Path:
    """Write `reward` (weights, config, threshold and info) to `path` atomically."""
    with atomic_directory(path) as tmp:
        reward.model.save_pretrained(str(tmp))
        marker = {"format": "wmpo-reward", "threshold": reward.threshold, **reward.info}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True))
    return path


def load_reward_model(path: Path | str, device: str = "cpu") -> RewardModel:
    """Load a checkpoint directory (`UserError` in one line when it is not one)."""
    root = Path(path)
    marker = root / MARKER_FILE
    if not marker.is_file():
        raise UserError(f"{root} is not a wmpo reward-model checkpoint (no {MARKER_FILE})")
    info: dict[str, Any] = json.loads(marker.read_text())
    model = VideoMAEForVideoClassification.from_pretrained(str(root), local_files_only=True)
    model.to(device).eval()  # type: ignore[arg-type]
    return RewardModel(model, float(info.get("threshold", DEFAULT_THRESHOLD)), info)
