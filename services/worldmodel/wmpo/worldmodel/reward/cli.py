"""`wmpo reward ...`: training, evaluation and publishing of the reward model (its serving is the world model's
Triton, `wmpo worldmodel serve`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wmpo.common.cli import check_device
from wmpo.common.errors import UserError

app = typer.Typer(help="The reward model (video success classifier): training and evaluation.", no_args_is_help=True)

DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]


@app.command("publish")
def publish(
    checkpoint: Annotated[Path, typer.Argument(help="Reward-model checkpoint to publish.")],
    registry: Annotated[str, typer.Option(help="Registry root.")],
) -> None:
    """Publish a reward-model checkpoint as the next version (a Triton serving from the registry swaps it in)."""
    from wmpo.common.registry import Registry
    from wmpo.worldmodel.reward.checkpoint import load_reward_model

    try:
        load_reward_model(checkpoint)
    except (OSError, ValueError) as exc:
        raise UserError(f"{checkpoint} is not a reward-model checkpoint: {exc}") from exc
    info = Registry(registry, "reward").publish(checkpoint)
    typer.echo(f"published reward-model version {info.version} (sha256 {info.sha256[:12]})")


@app.command("train")
def train(
    data: Annotated[Path, typer.Option(help="Dataset folder (successes and failures).")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    config: Annotated[str, typer.Option(help="tiny or base.")] = "tiny",
    steps: Annotated[int, typer.Option(min=1)] = 500,
    clip_len: Annotated[int, typer.Option(min=2, help="Frames per clip (even).")] = 8,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Success probability threshold.")] = 0.96,
    device: DeviceOpt = "cpu",
) -> None:
    """Train the VideoMAE success classifier on the dataset's clips."""
    from tqdm import tqdm

    from wmpo.worldmodel.reward.train import RewardConfig, train_reward

    check_device(device)
    bar = tqdm(total=steps, desc="reward", unit="step")
    cfg = RewardConfig(preset=config, steps=steps, clip_len=clip_len, threshold=threshold, device=device)

    def progress(_step: int, loss: float) -> None:
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")

    _model, metrics = train_reward(data, out, cfg, on_step=progress)
    bar.close()
    typer.echo(f"checkpoint {out}; held-out {json.dumps({k: round(v, 3) for k, v in metrics.items()})}")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Reward-model checkpoint.")],
    data: Annotated[Path, typer.Option(help="Dataset folder.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Accuracy, precision, recall, F1 and AUROC on every clip of a dataset."""
    from wmpo.data.dataset import TrajectoryDataset
    from wmpo.worldmodel.reward.checkpoint import load_reward_model
    from wmpo.worldmodel.reward.metrics import evaluate_clips

    reward = load_reward_model(checkpoint)
    clips = TrajectoryDataset(data).reward_clips(reward.clip_len)
    metrics = evaluate_clips(reward, clips, list(range(len(clips))))
    typer.echo(
        json.dumps(metrics, sort_keys=True) if as_json else "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    )
