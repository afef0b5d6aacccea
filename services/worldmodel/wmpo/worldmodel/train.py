"""World-model training: EDM on (K context, F actions, F future) windows, with EMA weights, resume,
periodic one-step evaluation against copy-last-frame, and fine-tuning from `--init` (WMPO's alignment)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmpo.common.errors import UserError
from wmpo.common.logs import get_logger
from wmpo.data.dataset import TrajectoryDataset, WorldModelWindows, split_episodes
from wmpo.worldmodel.checkpoint import TRAINING_DIR, load_world_model, save_world_model
from wmpo.worldmodel.model import WorldModel, make_world_model, to_model_frames

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


def _batch(windows: WorldModelWindows, rows: list[int], device: str) -> tuple[torch.Tensor, ...]:
    items = [windows[i] for i in rows]
    context = to_model_frames(torch.from_numpy(np.stack([it["context"] for it in items])))
    actions = torch.from_numpy(np.stack([it["actions"] for it in items])).float()
    future = to_model_frames(torch.from_numpy(np.stack([it["future"] for it in items])))
    return context.to(device), actions.to(device), future.to(device)


def one_step_mse(
    model: WorldModel, windows: WorldModelWindows, rows: list[int], steps: int, device: str
) -> dict[str, float]:
    """Mean squared error (pixels in [-1, 1]) of the first imagined frame vs copying the last context frame."""
    model.eval()
    errors, baseline = [], []
    generator = torch.Generator().manual_seed(0)
    for i in range(0, len(rows), 16):
        context, actions, future = _batch(windows, rows[i : i + 16], device)
        imagined = model.sample(context, actions, steps=steps, generator=generator)
        errors.append(((imagined[:, 0] - future[:, 0]) ** 2).mean(dim=(1, 2, 3)).cpu())
        baseline.append(((context[:, -1] - future[:, 0]) ** 2).mean(dim=(1, 2, 3)).cpu())
    return {"mse_h1": float(torch.cat(errors).mean()), "copy_last_mse_h1": float(torch.cat(baseline).mean())}


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
    state_path = out / TRAINING_DIR / "state.pt"
    state: dict[str, Any] | None = None
    if state_path.is_file():
        model, _info = load_world_model(out, config.device)
        state = torch.load(state_path, map_location=config.device, weights_only=False)
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
        context, actions, future = _batch(
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
    training = out / TRAINING_DIR
    training.mkdir(exist_ok=True)
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "evals": evals},
               training / "state.pt")  # fmt: skip
    (training / "config.json").write_text(json.dumps(asdict(config), indent=2))
    with (training / "log.jsonl").open("a") as fh:
        fh.write(json.dumps(evals[-1] if evals else {"step": step}) + "\n")
