"""World-model training: EDM on (K context, F actions, F future) windows, with EMA weights, resume (state in
``<out>/training/``, see `wmpo.common.training_state`), periodic one-step evaluation against copy-last-frame
(`metrics.one_step_mse`), and fine-tuning from `--init` (WMPO's alignment)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmpo.common.errors import UserError
from wmpo.common.logs import get_logger
from wmpo.common.training_state import load_training_state, save_training_state
from wmpo.data.dataset import TrajectoryDataset, split_episodes
from wmpo.worldmodel.checkpoint import load_world_model, save_world_model
from wmpo.worldmodel.metrics import one_step_mse, window_batch
from wmpo.worldmodel.model import WorldModel, make_world_model

log = get_logger(__name__)


@dataclass
class WMTrainConfig:
    """Hyper-parameters of world-model training."""

    preset: str = "tiny"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    warmup_steps: int = 50
    grad_clip: float = 1.0
    eval_every: int = 200
    val_fraction: float = 0.1
    val_windows: int = 32
    sampler_steps: int = 3
    seed: int = 0
    device: str = "cpu"
    context_frames: int = 4
    future_frames: int = 8
    model_overrides: dict[str, Any] | None = None


@dataclass
class WMTrainResult:
    steps: int
    train_loss: float
    evals: list[dict[str, float]]
    checkpoint: Path


def train_world_model(
    data: Path,
    out: Path,
    config: WMTrainConfig,
    *,
    init: Path | None = None,
    on_step: Callable[[int, float, dict[str, float] | None], None] | None = None,
) -> WMTrainResult:
    """Train (resume, or fine-tune from `init`) a world model on the episodes of `data`; checkpoints to `out`."""
    torch.manual_seed(config.seed)
    dataset = TrajectoryDataset(data)
    if len(dataset) == 0:
        raise UserError(f"{data} holds no readable episodes; collect some with `wmpo data collect`")
    windows = dataset.world_model_windows(config.context_frames, config.future_frames)
    if len(windows) == 0:
        raise UserError(f"{data}: no episode is longer than {config.future_frames} steps")
    _train_ids, val_ids = split_episodes(len(dataset), config.val_fraction, config.seed)
    val_eps = set(val_ids)
    train_rows = [i for i, (e, _t) in enumerate(windows.index) if int(e) not in val_eps]
    val_rows = [i for i, (e, _t) in enumerate(windows.index) if int(e) in val_eps] or train_rows
    val_rows = sorted(np.random.default_rng(config.seed).permutation(val_rows)[: config.val_windows].tolist())
    state = load_training_state(out, config.device)
    if state is not None:
        model, _info = load_world_model(out, config.device)
        log.info("resuming world-model training", checkpoint=str(out), step=state["step"])
    elif init is not None:
        model, _info = load_world_model(init, config.device)
        log.info("fine-tuning world model", init=str(init))
    else:
        frame = dataset.episode(0).frames
        model = make_world_model(
            config.preset, image_size=int(frame.shape[1]), channels=int(frame.shape[-1]),
            context_frames=config.context_frames, future_frames=config.future_frames,
            action_dim=int(dataset.episode(0).actions.shape[1]), **(config.model_overrides or {}),
        )  # fmt: skip
        model.to(config.device)
    ema = copy.deepcopy(model).eval()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    evals: list[dict[str, float]] = []
    if state is not None:
        model.load_state_dict(state["model"])  # the raw (non-EMA) weights
        optimizer.load_state_dict(state["optimizer"])
        start, evals = int(state["step"]), list(state["evals"])
    rng = np.random.default_rng([config.seed, start])
    generator = torch.Generator(device="cpu").manual_seed(config.seed + start)
    loss_value = float("nan")
    for step in range(start + 1, config.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, step / max(1, config.warmup_steps))
        context, actions, future = window_batch(
            windows, rng.choice(train_rows, size=config.batch_size).tolist(), config.device
        )
        loss = model.training_loss(context, actions, future, generator=generator if config.device == "cpu" else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        loss_value = float(loss.detach())
        report = None
        if step % config.eval_every == 0 or step == config.steps:
            report = {"step": float(step), "train_loss": loss_value,
                      **one_step_mse(ema, windows, val_rows, config.sampler_steps, config.device)}  # fmt: skip
            evals.append(report)
            _save(model, ema, optimizer, out, step, evals, config)
            model.train()
        if on_step is not None:
            on_step(step, loss_value, report)
    if start >= config.steps and not (out / "config.json").is_file():
        _save(model, ema, optimizer, out, start, evals, config)
    return WMTrainResult(max(start, config.steps), loss_value, evals, out)


def _save(
    model: WorldModel,
    ema: WorldModel,
    optimizer: torch.optim.Optimizer,
    out: Path,
    step: int,
    evals: list[dict[str, float]],
    config: WMTrainConfig,
) -> None:
    save_world_model(ema, out, {"steps": step, "last_eval": evals[-1] if evals else None})
    save_training_state(
        out,
        {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "evals": evals},
        config=asdict(config),
        log=evals[-1] if evals else {"step": step},
    )
