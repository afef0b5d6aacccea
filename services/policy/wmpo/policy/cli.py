"""`wmpo policy ...`: imitation training, the policy server, and the policy registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wmpo.common.cli import add_config_command, check_device
from wmpo.common.errors import UserError
from wmpo.policy.settings import PolicyServiceSettings

app = typer.Typer(help="The VLA policy: training and the gRPC policy server.", no_args_is_help=True)
add_config_command(app, PolicyServiceSettings)

RegistryOpt = Annotated[str, typer.Option("--registry", help="Registry root (directory or file:///path).")]
RedisOpt = Annotated[str | None, typer.Option("--redis", help="Redis URL for version notifications.")]


@app.command("train-bc")
def train_bc_command(
    data: Annotated[Path, typer.Option(help="Dataset folder (from `wmpo data collect`).")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory (resumed when it holds training state).")],
    config: Annotated[str, typer.Option(help="Model size: tiny (CPU) or base (one GPU).")] = "tiny",
    steps: Annotated[int, typer.Option(min=1, help="Total optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(min=0.0)] = 3e-4,
    eval_every: Annotated[int, typer.Option(min=1, help="Validate and checkpoint every N steps.")] = 100,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
    proprio: Annotated[
        bool, typer.Option(help="Feed proprio to the policy (--no-proprio for WMPO: imagination has images only).")
    ] = True,
) -> None:
    """Train the VLA by imitation (behaviour cloning) on a trajectory dataset."""
    from tqdm import tqdm

    from wmpo.policy.train import BCConfig, train_bc

    check_device(device)
    if not data.is_dir():
        raise UserError(f"{data} is not a dataset folder")
    cfg = BCConfig(
        preset=config,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        eval_every=eval_every,
        device=device,
        seed=seed,
        use_proprio=proprio,
    )
    bar = tqdm(total=steps, desc="train-bc", unit="step")
    last_val: list[float] = []

    def progress(step: int, loss: float, val: float | None) -> None:
        if bar.n == 0 and step > 1:
            bar.update(step - 1)
        if val is not None:
            last_val.append(val)
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{last_val[-1]:.3f}" if last_val else "-")

    try:
        result = train_bc(data, out, cfg, on_step=progress)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    bar.close()
    vals = ", ".join(f"{s}: {v:.3f}" for s, v in result.val_losses[-3:])
    typer.echo(
        f"checkpoint {result.checkpoint} (step {result.steps}, train loss {result.train_loss:.3f}; val {vals or '-'})"
    )


@app.command()
def serve(
    checkpoint: Annotated[Path | None, typer.Option(help="Serve this checkpoint directory.")] = None,
    registry: Annotated[str | None, typer.Option(help="Serve versions from this registry.")] = None,
    version: Annotated[str | None, typer.Option(help="Alias or version to follow (registry only).")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    auth_tokens: Annotated[
        Path | None, typer.Option("--auth-tokens", help="File with one bearer token per line.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate (with --tls-key).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM key.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    redis: RedisOpt = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port (0: off).")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="YAML settings file.")] = None,
) -> None:
    """Serve the `wmpo.v1.Policy` gRPC API (Act, StreamAct, ListVersions, GetPolicyInfo)."""
    from wmpo.policy.serving.server import PolicyServer

    settings = PolicyServiceSettings.load(
        config_file,
        checkpoint=checkpoint,
        registry=registry,
        version=version,
        host=host,
        port=port,
        auth_tokens_file=auth_tokens,
        tls_cert=tls_cert,
        tls_key=tls_key,
        device=device,
        redis_url=redis,
        metrics_port=metrics_port,
    )
    check_device(settings.device)
    if settings.checkpoint is None and settings.registry is None:
        raise UserError("give --checkpoint DIR or --registry URI")
    server = PolicyServer(settings).start()
    typer.echo(f"policy server on {server.address}", err=True)
    server.wait()


@app.command()
def publish(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory to publish.")],
    registry: RegistryOpt,
    redis: RedisOpt = None,
    note: Annotated[str, typer.Option(help="Free text stored with the version.")] = "",
) -> None:
    """Publish a checkpoint as the next policy version (moves `latest`)."""
    from wmpo.common.registry import Registry
    from wmpo.policy.checkpoint import load_policy

    load_policy(checkpoint)  # refuse what would not load
    info = Registry(registry, "policy", redis_url=redis).publish(checkpoint, {"note": note} if note else {})
    typer.echo(f"published policy version {info.version} (sha256 {info.sha256[:12]})")


@app.command()
def versions(
    registry: RegistryOpt, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """List the published policy versions and aliases."""
    from wmpo.common.registry import Registry

    reg = Registry(registry, "policy")
    aliases = reg.aliases()
    rows = [
        {**info.to_json(), "aliases": sorted(a for a, v in aliases.items() if v == info.version)} for info in reg.list()
    ]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        typer.echo(f"{row['version']:>4}  {row['sha256'][:12]}  {', '.join(row['aliases'])}")


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Version number or alias to promote.")],
    registry: RegistryOpt,
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "stable",
    redis: RedisOpt = None,
) -> None:
    """Point an alias (default `stable`) at a version."""
    from wmpo.common.registry import Registry, VersionNotFoundError

    try:
        target = Registry(registry, "policy", redis_url=redis).set_alias(alias, version)
    except VersionNotFoundError as exc:
        raise UserError(str(exc.args[0])) from None
    typer.echo(f"{alias} -> {target}")


@app.command()
def rollback(
    registry: RegistryOpt,
    alias: Annotated[str, typer.Option(help="Alias to move back.")] = "latest",
    redis: RedisOpt = None,
) -> None:
    """Point an alias back at the version it pointed to before its last move."""
    from wmpo.common.registry import Registry

    target = Registry(registry, "policy", redis_url=redis).rollback(alias)
    typer.echo(f"{alias} -> {target}")
