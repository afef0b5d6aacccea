"""`wmpo worldmodel ...`: training, evaluation, Triton serving, the Imagination API (`wmpo reward ...` is in
`reward/cli.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wmpo.common.cli import add_config_command, check_device
from wmpo.common.errors import UserError
from wmpo.worldmodel.settings import WorldModelServiceSettings

app = typer.Typer(
    help="The world model and reward model: training, Triton serving, Imagination API.", no_args_is_help=True
)
add_config_command(app, WorldModelServiceSettings)

DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Dataset folder.")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory (resumed when it holds training state).")],
    init: Annotated[
        Path | None, typer.Option(help="Fine-tune from this checkpoint (policy-behaviour alignment).")
    ] = None,
    config: Annotated[str, typer.Option(help="tiny (CPU) or base (one GPU).")] = "tiny",
    steps: Annotated[int, typer.Option(min=1)] = 2000,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    lr: Annotated[float, typer.Option(min=0.0)] = 3e-4,
    eval_every: Annotated[int, typer.Option(min=1)] = 200,
    device: DeviceOpt = "cpu",
    seed: int = 0,
) -> None:
    """Train the action-conditioned video diffusion world model (EDM, EMA weights, resumable)."""
    from tqdm import tqdm

    from wmpo.worldmodel.train import WMTrainConfig, train_world_model

    check_device(device)
    if not data.is_dir():
        raise UserError(f"{data} is not a dataset folder")
    cfg = WMTrainConfig(preset=config, steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, device=device,
                        seed=seed)  # fmt: skip
    bar = tqdm(total=steps, desc="worldmodel", unit="step")
    last: list[dict[str, float]] = []

    def progress(step: int, loss: float, report: dict[str, float] | None) -> None:
        if bar.n == 0 and step > 1:
            bar.update(step - 1)
        if report:
            last.append(report)
        bar.update()
        postfix = {"loss": f"{loss:.3f}"}
        if last:
            postfix |= {"h1_mse": f"{last[-1]['mse_h1']:.4f}", "copy": f"{last[-1]['copy_last_mse_h1']:.4f}"}
        bar.set_postfix(postfix)

    result = train_world_model(data, out, cfg, init=init, on_step=progress)
    bar.close()
    typer.echo(f"checkpoint {result.checkpoint} (step {result.steps}); last eval {json.dumps(result.evals[-1:])}")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="World-model checkpoint.")],
    data: Annotated[Path, typer.Option(help="Dataset folder with held-out episodes.")],
    episodes: Annotated[int, typer.Option(min=1, help="Episodes to replay.")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="Euler steps per chunk.")] = 3,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    video: Annotated[Path | None, typer.Option("--video", help="Write real|imagined GIFs here.")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Open-loop fidelity: PSNR/SSIM at horizons 1, 8, 16, 32 next to copy-last-frame."""
    from wmpo.data.dataset import TrajectoryDataset
    from wmpo.worldmodel.checkpoint import load_world_model
    from wmpo.worldmodel.metrics import evaluate_fidelity

    check_device(device)
    model, _ = load_world_model(checkpoint, device)
    dataset = TrajectoryDataset(data)
    chosen = [dataset.episode(i) for i in range(min(episodes, len(dataset)))]
    if not chosen:
        raise UserError(f"{data} holds no readable episodes")
    report = evaluate_fidelity(model, chosen, steps=steps, video_dir=video)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), sort_keys=True))
        return
    typer.echo(f"{'horizon':>8} {'PSNR':>7} {'SSIM':>6} | {'copy PSNR':>9} {'copy SSIM':>9}")
    for h in report.horizons:
        model_scores = f"{report.psnr[h]:7.2f} {report.ssim[h]:6.3f}"
        typer.echo(f"{h:>8} {model_scores} | {report.copy_psnr[h]:9.2f} {report.copy_ssim[h]:9.3f}")
    for path in report.videos:
        typer.echo(f"video: {path}")


@app.command()
def serve(
    checkpoint: Annotated[Path | None, typer.Option(help="World-model checkpoint.")] = None,
    reward: Annotated[
        Path | None, typer.Option(help="Reward-model checkpoint (default: the registry's latest reward model).")
    ] = None,
    registry: Annotated[
        str | None, typer.Option(help="Serve the registry's latest world (and reward) model, hot-swapped.")
    ] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="YAML settings file.")] = None,
) -> None:
    """Run NVIDIA Triton (PyTriton) with the `dream` and `reward` models on the KServe-v2 ports."""
    import signal
    import threading

    from wmpo.common.triton import TritonPorts
    from wmpo.worldmodel.serving.triton import serve_models

    settings = WorldModelServiceSettings.load(config_file, checkpoint=checkpoint, reward_checkpoint=reward)
    check_device(settings.device)
    if registry is None and (settings.checkpoint is None or settings.reward_checkpoint is None):
        raise UserError("give --checkpoint and --reward, or --registry (for whichever is not given)")
    ports = TritonPorts(settings.triton_grpc_port, settings.triton_http_port, settings.triton_metrics_port)
    triton, _models, watcher = serve_models(
        settings.checkpoint, settings.reward_checkpoint, ports, registry=registry, device=settings.device,
        sampler_steps=settings.sampler_steps, max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us, bind_address=settings.host,
    )  # fmt: skip
    typer.echo(f"triton: grpc {ports.grpc}, http {ports.http}, metrics {ports.metrics}", err=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    if watcher is not None:
        watcher.stop()
    triton.stop()


@app.command()
def imagination(
    triton: Annotated[str | None, typer.Option(help="Triton gRPC address (host:port).")] = None,
    redis: Annotated[str | None, typer.Option(help="Redis URL for session state.")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port of the Imagination API.")] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset whose episodes can be Reset from.")] = None,
    auth_tokens: Annotated[Path | None, typer.Option("--auth-tokens", help="Bearer tokens file.")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="YAML settings file.")] = None,
) -> None:
    """Serve the `wmpo.v1.Imagination` gRPC API (Reset/Step/Close sessions in Redis)."""
    import signal
    import threading

    from wmpo.common.auth import BearerTokenInterceptor, load_tokens
    from wmpo.common.grpc_server import GrpcServer
    from wmpo.v1 import imagination_pb2_grpc
    from wmpo.worldmodel.serving.client import WorldModelClient
    from wmpo.worldmodel.serving.imagination import SERVICE_NAME, ImaginationServicer, SessionLimits

    settings = WorldModelServiceSettings.load(config_file, triton_url=triton, redis_url=redis, imagination_port=port)
    limits = SessionLimits(
        settings.session_ttl_s, settings.max_sessions, settings.default_horizon, settings.success_threshold
    )
    servicer = ImaginationServicer(WorldModelClient(settings.triton_url), settings.redis_url, limits, dataset=data)
    interceptors = [BearerTokenInterceptor(load_tokens(auth_tokens))] if auth_tokens else []
    server = GrpcServer(
        [lambda s: imagination_pb2_grpc.add_ImaginationServicer_to_server(servicer, s)],
        host=settings.host, port=settings.imagination_port, interceptors=interceptors, service_names=[SERVICE_NAME],
    ).start()  # fmt: skip
    server.set_serving(True)
    typer.echo(f"imagination API on {server.address}", err=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    servicer.close()


@app.command()
def publish(
    checkpoint: Annotated[Path, typer.Argument(help="World-model checkpoint to publish.")],
    registry: Annotated[str, typer.Option(help="Registry root.")],
) -> None:
    """Publish a world-model checkpoint as the next version (a serving Triton swaps it in)."""
    from wmpo.common.registry import Registry
    from wmpo.worldmodel.checkpoint import load_world_model

    load_world_model(checkpoint)
    info = Registry(registry, "worldmodel").publish(checkpoint)
    typer.echo(f"published world-model version {info.version} (sha256 {info.sha256[:12]})")
