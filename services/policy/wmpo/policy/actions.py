"""Actions as tokens: per-dimension normalisation to [-1, 1] and 256 uniform bins (OpenVLA-style).

The normalisation bounds (1st and 99th percentiles of the training actions) and the proprio mean/std are
saved beside the weights as ``action_stats.json``, so a checkpoint decodes its own tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wmpo.common.tensors import Array

STATS_FILE = "action_stats.json"


@dataclass
class ActionCodec:
    """Maps actions to bin indices and back; `low`/`high` are per-dimension normalisation bounds."""

    low: list[float]
    high: list[float]
    proprio_mean: list[float]
    proprio_std: list[float]
    num_bins: int = 256

    @classmethod
    def identity(cls, action_dim: int, proprio_dim: int, num_bins: int = 256) -> ActionCodec:
        """Bounds [-1, 1] and unit proprio scaling (actions already normalised, as in the simulator)."""
        return cls([-1.0] * action_dim, [1.0] * action_dim, [0.0] * proprio_dim, [1.0] * proprio_dim, num_bins)

    @classmethod
    def fit(cls, actions: Array, proprio: Array, num_bins: int = 256) -> ActionCodec:
        """Bounds from the 1st/99th percentiles of `actions` [N, A]; proprio mean/std from `proprio` [N, P]."""
        low = np.quantile(actions, 0.01, axis=0)
        high = np.quantile(actions, 0.99, axis=0)
        same = high - low < 1e-6
        low, high = np.where(same, low - 1.0, low), np.where(same, high + 1.0, high)
        std = proprio.std(axis=0) if len(proprio) else np.ones(proprio.shape[1])
        mean = proprio.mean(axis=0) if len(proprio) else np.zeros(proprio.shape[1])
        return cls(low.tolist(), high.tolist(), mean.tolist(), np.maximum(std, 1e-6).tolist(), num_bins)

    def normalize(self, actions: Array) -> Array:
        low, high = np.asarray(self.low, np.float32), np.asarray(self.high, np.float32)
        return np.clip(2.0 * (actions - low) / (high - low) - 1.0, -1.0, 1.0).astype(np.float32)

    def unnormalize(self, normalized: Array) -> Array:
        low, high = np.asarray(self.low, np.float32), np.asarray(self.high, np.float32)
        result: Array = ((normalized + 1.0) / 2.0 * (high - low) + low).astype(np.float32)
        return result

    def to_tokens(self, actions: Array) -> Array:
        """Bin index of each action value (int64, same shape)."""
        scaled = (self.normalize(actions) + 1.0) / 2.0 * self.num_bins
        tokens: Array = np.clip(np.floor(scaled), 0, self.num_bins - 1).astype(np.int64)
        return tokens

    def to_actions(self, tokens: Array) -> Array:
        """Bin centres of the tokens, in the original action units (float32)."""
        centres = (np.asarray(tokens, np.float32) + 0.5) / self.num_bins * 2.0 - 1.0
        return self.unnormalize(centres)

    def scale_proprio(self, proprio: Array) -> Array:
        return (
            (proprio - np.asarray(self.proprio_mean, np.float32)) / np.asarray(self.proprio_std, np.float32)
        ).astype(np.float32)

    def save(self, directory: Path) -> None:
        (directory / STATS_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> ActionCodec:
        return cls(**json.loads((directory / STATS_FILE).read_text()))
