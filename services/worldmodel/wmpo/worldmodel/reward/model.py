"""The reward model: a VideoMAE success classifier (from `transformers` config) over the last N frames.

`RewardModel.probability` gives P(success) for clips; an episode succeeds at the first frame whose trailing
clip reaches the model's threshold (saved with the checkpoint, see `checkpoint.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification

from wmpo.common.tensors import Array

DEFAULT_THRESHOLD = 0.96
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.2M parameters: ~0.4 s per batch-16 forward on 2 CPU cores (DESIGN.md §7).
    "tiny": {"patch_size": 8, "tubelet_size": 2, "hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 192},
    "base": {"patch_size": 16, "tubelet_size": 2, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
             "intermediate_size": 1536},
}  # fmt: skip


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
    def create(cls, preset: str, image_size: int, clip_len: int, threshold: float = DEFAULT_THRESHOLD) -> RewardModel:
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
