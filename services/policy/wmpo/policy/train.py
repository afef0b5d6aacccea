"""Imitation (behaviour cloning) training of the VLA on a trajectory dataset.

Cross-entropy on the action tokens of each chunk (padding past an episode's end masked out), AdamW with
warm-up and cosine decay, a validation split by episode, periodic checkpoints that `--out` can resume
from (the optimizer state and the loss log live in ``<out>/training/``, see `wmpo.common.training_state`).
The loss and the validation loss are in `metrics.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from wmpo.common.errors import UserError
from wmpo.common.logs import get_logger
from wmpo.common.training_state import load_training_state, save_training_state
from wmpo.data.dataset import TrajectoryDataset, split_episodes
from wmpo.policy.actions import ActionCodec
from wmpo.policy.checkpoint import PolicyBundle, load_policy, save_policy
from wmpo.policy.metrics import bc_loss, sample_batch, validation_loss
from wmpo.policy.model import VLAPolicy, make_config
from wmpo.policy.tokenizer import build_byte_tokenizer

log = get_logger(__name__)


@dataclass
class BCConfig:
    """Hyper-parameters of imitation training."""

    preset: str = "tiny"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    eval_every: int = 100
    val_fraction: float = 0.1
    val_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    chunk_length: int = 8
    use_proprio: bool = True  # False: images + instruction only (what WMPO's world model can imagine)


@dataclass
class BCResult:
    steps: int
    train_loss: float
    val_losses: list[tuple[int, float]]
    checkpoint: Path


def train_bc(
    data: Path, out: Path, config: BCConfig, *, on_step: Callable[[int, float, float | None], None] | None = None
) -> BCResult:
    """Train (or resume training) a VLA by imitation on the episodes of `data`; checkpoints go to `out`."""
    torch.manual_seed(config.seed)
    dataset = TrajectoryDataset(data)
    if len(dataset) == 0:
        raise UserError(f"{data} holds no readable episodes; collect some with `wmpo data collect`")
    train_ids, val_ids = split_episodes(len(dataset), config.val_fraction, config.seed)
    all_samples = dataset.policy_samples(config.chunk_length)
    train_rows = [i for i, (e, _t) in enumerate(all_samples.index) if int(e) in set(train_ids)]
    val_rows = [i for i, (e, _t) in enumerate(all_samples.index) if int(e) in set(val_ids)]
    state = load_training_state(out, config.device)
    if state is not None:
        bundle = load_policy(out, device=config.device)
        start = int(state["step"])
        log.info("resuming imitation training", checkpoint=str(out), step=start)
    else:
        episodes = [dataset.episode(i) for i in train_ids]
        codec = ActionCodec.fit(
            np.concatenate([e.actions for e in episodes]), np.concatenate([e.proprio for e in episodes])
        )
        first = episodes[0]
        tokenizer = build_byte_tokenizer()
        model_config = make_config(
            config.preset,
            vocab_size=len(tokenizer),
            action_dim=first.actions.shape[1],
            proprio_dim=first.proprio.shape[1] if config.use_proprio else 0,
            chunk_length=config.chunk_length,
            image_size=first.frames.shape[1],
        )
        model = VLAPolicy(model_config)
        model.to(config.device)  # type: ignore[arg-type]
        bundle = PolicyBundle(model, tokenizer, codec)
        start = 0
    optimizer = torch.optim.AdamW(bundle.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    rng = np.random.default_rng([config.seed, start])
    val_losses: list[tuple[int, float]] = list(state["val_losses"]) if state else []
    train_loss = float("nan")
    val_subset = sorted(
        np.random.default_rng(config.seed).permutation(val_rows)[: config.val_batches * config.batch_size]
    )
    for step in range(start + 1, config.steps + 1):
        bundle.model.train()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step - 1, config)
        inputs, tokens, mask = sample_batch(
            bundle, all_samples, rng.choice(train_rows, size=config.batch_size).tolist()
        )
        loss = bc_loss(bundle, inputs, tokens, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bundle.model.parameters(), config.grad_clip)
        optimizer.step()
        train_loss = float(loss.detach())
        val = None
        if step % config.eval_every == 0 or step == config.steps:
            val = validation_loss(bundle, all_samples, val_subset, config.batch_size)
            if val is not None:
                val_losses.append((step, val))
            _save(bundle, out, optimizer, step, val_losses, config, train_loss)
        if on_step is not None:
            on_step(step, train_loss, val)
    if start >= config.steps and not (out / "model.safetensors").is_file():
        _save(bundle, out, optimizer, start, val_losses, config, train_loss)
    return BCResult(max(start, config.steps), train_loss, val_losses, out)


def _lr_factor(step: int, config: BCConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save(
    bundle: PolicyBundle,
    out: Path,
    optimizer: torch.optim.Optimizer,
    step: int,
    val_losses: list[tuple[int, float]],
    config: BCConfig,
    train_loss: float,
) -> None:
    info = {"trained_by": "bc", "bc_steps": step, "bc_train_loss": train_loss,
            "bc_val_loss": val_losses[-1][1] if val_losses else None}  # fmt: skip
    save_policy(bundle, out, info)
    save_training_state(
        out,
        {"step": step, "optimizer": optimizer.state_dict(), "val_losses": val_losses},
        config=asdict(config),
        log={"step": step, "train_loss": train_loss, "val_loss": info["bc_val_loss"]},
    )
