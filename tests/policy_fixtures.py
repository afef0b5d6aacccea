"""Shared builders for policy tests: tiny random-weight checkpoints and in-process policy servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wmpo.common.tensors import Array
from wmpo.policy.actions import ActionCodec
from wmpo.policy.checkpoint import PolicyBundle, save_policy
from wmpo.policy.model import VLAPolicy, make_config
from wmpo.policy.serving.server import PolicyServer
from wmpo.policy.settings import PolicyServiceSettings
from wmpo.policy.tokenizer import build_byte_tokenizer


def make_checkpoint(path: Path, seed: int = 0, *, proprio_dim: int = 4, image_size: int | None = None) -> Path:
    """Save a tiny VLA with random weights (different `seed`, different policy)."""
    import torch

    torch.manual_seed(seed)
    tokenizer = build_byte_tokenizer()
    config = make_config("tiny", vocab_size=len(tokenizer), proprio_dim=proprio_dim, image_size=image_size)
    model = VLAPolicy(config)
    save_policy(PolicyBundle(model, tokenizer, ActionCodec.identity(4, proprio_dim), {"seed": seed}), path)
    return path


def start_server(**settings: Any) -> PolicyServer:
    """A `PolicyServer` on a free 127.0.0.1 port; stop it with `.stop()`."""
    poll = settings.pop("poll_interval_s", 0.2)
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "max_batch_wait_ms": 5.0} | settings
    return PolicyServer(PolicyServiceSettings.model_validate(values), poll_interval_s=poll).start()


def observation(seed: int = 0, size: int = 64) -> tuple[dict[str, Array], Array]:
    rng = np.random.default_rng(seed)
    return {"main": rng.integers(0, 255, (size, size, 3), dtype=np.uint8)}, rng.normal(size=4).astype(np.float32)
