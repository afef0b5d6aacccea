"""Policy checkpoint directories (`save_policy`/`load_policy`) and `PolicyBundle`, the checkpoint loaded.

A checkpoint directory holds ``config.json`` + ``model.safetensors`` (the `VLAPolicy`), ``tokenizer/``,
``action_stats.json`` (the `ActionCodec`), ``wmpo_policy.json`` (format marker and training summary), and
``training/`` state for resume (`wmpo.common.training_state`). The bundle turns numpy observations into model
inputs, samples action chunks (tokens, actions, log-probs), and recomputes log-probs of given tokens with
gradients for GRPO.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmpo.common.errors import UserError
from wmpo.common.fsutil import atomic_directory
from wmpo.common.tensors import Array
from wmpo.common.training_state import TRAINING_DIR
from wmpo.policy.actions import ActionCodec
from wmpo.policy.model import VLAPolicy, sample_tokens, token_logprobs
from wmpo.policy.tokenizer import load_tokenizer

MARKER_FILE = "wmpo_policy.json"
FORMAT = "wmpo-vla"


@dataclass
class PolicyInputs:
    """Model inputs for a batch of observations."""

    pixel_values: torch.Tensor
    proprio: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> PolicyInputs:
        return PolicyInputs(
            *(t.to(device) for t in (self.pixel_values, self.proprio, self.input_ids, self.attention_mask))
        )


@dataclass
class ActBatch:
    """A sampled chunk for each observation of a batch."""

    tokens: Array  # int32 [B, T, A]
    actions: Array  # float32 [B, T, A]
    logprobs: Array  # float32 [B, T, A]


class PolicyBundle:
    """A VLA with its tokenizer and action codec, on one device."""

    def __init__(
        self, model: VLAPolicy, tokenizer: Any, codec: ActionCodec, info: dict[str, Any] | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec
        self.info = info or {}
        cfg = model.config
        vision: Any = cfg.vision_config
        self.image_size = int(vision.image_size)
        self.camera_names: list[str] = list(cfg.camera_names or ["main"])
        self.action_dim = int(cfg.action_dim)
        self.chunk_length = int(cfg.chunk_length)
        self.proprio_dim = int(cfg.proprio_dim)
        self.max_instruction_tokens = int(cfg.max_instruction_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(
        self, images: Sequence[dict[str, Array]], proprio: Sequence[Array], instructions: Sequence[str]
    ) -> PolicyInputs:
        """Stack numpy observations (uint8 HWC images per camera) into model inputs on the model's device.

        Instructions are right-padded to the batch's longest; the model numbers positions from the mask, so
        a row's outputs are the same alone or in any batch.
        """
        pixels = np.stack([np.stack([img[name] for name in self.camera_names]) for img in images])
        pixel_values = torch.from_numpy(pixels).permute(0, 1, 4, 2, 3).float().div_(127.5).sub_(1.0)
        state = (
            np.stack([self.codec.scale_proprio(np.asarray(p, np.float32)) for p in proprio])
            if self.proprio_dim
            else (np.zeros((len(images), 0), np.float32))
        )
        bos = self.tokenizer.bos_token_id
        ids = [
            [bos, *self.tokenizer(text, add_special_tokens=False).input_ids][: self.max_instruction_tokens]
            for text in instructions
        ]
        longest = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), longest), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return PolicyInputs(pixel_values, torch.from_numpy(state), input_ids, mask).to(self.device)

    def logits(self, inputs: PolicyInputs) -> torch.Tensor:
        return self.model(inputs.pixel_values, inputs.proprio, inputs.input_ids, inputs.attention_mask)  # type: ignore[no-any-return]

    @torch.no_grad()
    def act(self, inputs: PolicyInputs, temperatures: Sequence[float], seeds: Sequence[int | None]) -> ActBatch:
        """Sample one action chunk per row (each with its own temperature and seed)."""
        logits = self.logits(inputs)
        tokens, logps = sample_tokens(logits, list(temperatures), list(seeds))
        tokens_np = tokens.cpu().numpy()
        return ActBatch(
            tokens_np.astype(np.int32), self.codec.to_actions(tokens_np), logps.cpu().numpy().astype(np.float32)
        )

    def logprobs(self, inputs: PolicyInputs, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        """Log-probs [B, T, A] of given tokens under the current weights (with gradients, for GRPO)."""
        return token_logprobs(self.logits(inputs), tokens.to(self.device), temperature)

    def spec(self) -> dict[str, Any]:
        """The fields of `wmpo.v1.PolicySpec`."""
        return {
            "camera_names": self.camera_names,
            "image_height": self.image_size,
            "image_width": self.image_size,
            "image_channels": 3,
            "proprio_dim": self.proprio_dim,
            "action_dim": self.action_dim,
            "chunk_length": self.chunk_length,
            "num_bins": int(self.model.config.num_bins),
            "max_instruction_chars": 256,
            "model_config": str(self.model.config.preset),
        }


def save_policy(bundle: PolicyBundle, path: Path | str, info: dict[str, Any] | None = None) -> Path:
    """Write `bundle` to `path` atomically (`info` added to its marker), keeping an existing ``training/``."""
    target = Path(path)
    with atomic_directory(target, keep=(TRAINING_DIR,)) as tmp:
        bundle.model.save_pretrained(str(tmp))
        bundle.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        bundle.codec.save(tmp)
        marker = {"format": FORMAT, **bundle.info, **(info or {})}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True))
    return target


def load_policy(path: Path | str, device: str = "cpu") -> PolicyBundle:
    """Load a checkpoint directory (`UserError` in one line when it is not one or is incomplete)."""
    root = Path(path)
    marker = root / MARKER_FILE
    if not marker.is_file():
        raise UserError(f"{root} is not a wmpo policy checkpoint (no {MARKER_FILE})")
    try:
        info = json.loads(marker.read_text())
        model = VLAPolicy.from_pretrained(str(root), local_files_only=True)
        tokenizer = load_tokenizer(root / "tokenizer")
        codec = ActionCodec.load(root)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot load policy checkpoint {root}: {exc}".splitlines()[0]) from None
    model.to(device).eval()  # type: ignore[arg-type]
    return PolicyBundle(model, tokenizer, codec, info)
