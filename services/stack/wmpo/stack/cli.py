"""``wmpo stack up|down|status|logs``: the typer commands over `Stack`, and the table they print."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from wmpo.common.cli import check_device
from wmpo.common.errors import UserError
from wmpo.common.process import read_tail
from wmpo.stack.settings import ALIASES, DEFAULT_DIR, StackSettings
from wmpo.stack.stack import Stack
from wmpo.stack.supervisor import ServiceStatus, StackDown, StackStartError

app = typer.Typer(help="Run the wmpo services as local processes (Redis, Triton, policy, workers, API).",
                  no_args_is_help=True)  # fmt: skip

DirOpt = Annotated[Path | None, typer.Option("--dir", help="Stack state dir (default wmpo-data/stack).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file with a `stack:` section.")]
PortOpt = Annotated[int | None, typer.Option(min=0, max=65535, help="0: a free port.")]


def _say(line: str) -> None:
    typer.echo(f"stack: {line}", err=True)


@app.command()
def up(
    dir_: DirOpt = None,
    services: Annotated[str | None, typer.Option(help="Subset to start, e.g. redis,dream,policy.")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Rollout workers (default 1).")] = None,
    foreground: Annotated[bool, typer.Option(help="Stay attached; Ctrl-C or SIGTERM stops the stack.")] = False,
    registry: Annotated[Path | None, typer.Option(help="Registry dir (world model, reward, policy).")] = None,
    runs_dir: Annotated[Path | None, typer.Option(help="Runs dir of the trainer API.")] = None,
    worldmodel_checkpoint: Annotated[Path | None, typer.Option(help="World model to serve (else registry).")] = None,
    reward_checkpoint: Annotated[Path | None, typer.Option(help="Reward model to serve (else registry).")] = None,
    policy_checkpoint: Annotated[Path | None, typer.Option(help="Policy to serve (else registry).")] = None,
    policy_version: Annotated[str | None, typer.Option(help="Policy alias or version to follow.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    host: Annotated[str | None, typer.Option(help="Address the services listen on.")] = None,
    redis_port: PortOpt = None,
    triton_grpc_port: PortOpt = None,
    triton_http_port: PortOpt = None,
    triton_metrics_port: PortOpt = None,
    policy_port: PortOpt = None,
    policy_metrics_port: PortOpt = None,
    worker_metrics_port: PortOpt = None,
    api_port: PortOpt = None,
    worker_concurrency: Annotated[int | None, typer.Option(min=1, help="Episodes per worker at once.")] = None,
    token_file: Annotated[Path | None, typer.Option(help="Token file of the trainer API.")] = None,
    timeout: Annotated[float | None, typer.Option(min=1, help="Seconds to wait for each service.")] = None,
    config_file: ConfigOpt = None,
) -> None:
    """Start the stack in order (each service once what it needs is healthy) and return when all are healthy."""
    settings = StackSettings.load(
        config_file, dir=dir_, workers=workers, registry_dir=registry, runs_dir=runs_dir,
        worldmodel_checkpoint=worldmodel_checkpoint, reward_checkpoint=reward_checkpoint,
        policy_checkpoint=policy_checkpoint, policy_version=policy_version, device=device, host=host,
        redis_port=redis_port, triton_grpc_port=triton_grpc_port, triton_http_port=triton_http_port,
        triton_metrics_port=triton_metrics_port, policy_port=policy_port, policy_metrics_port=policy_metrics_port,
        worker_metrics_port=worker_metrics_port, api_port=api_port, worker_concurrency=worker_concurrency,
        api_token_file=token_file, start_timeout_s=timeout,
    )  # fmt: skip
    check_device(settings.device)
    stack = Stack(settings, config_file=config_file, progress=_say)
    if foreground:  # SIGTERM while starting stops what was started, like Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        statuses = stack.up(services)
    except KeyboardInterrupt:
        _say("interrupted; everything started was stopped")
        raise typer.Exit(130) from None
    except StackStartError as exc:
        if exc.log_tail:
            typer.echo(f"--- last lines of {exc.service}'s log ---", err=True)
        for line in exc.log_tail:
            typer.echo(f"  {line}", err=True)
        raise
    _print_table(statuses)
    if not foreground:
        hint = "" if stack.dir == DEFAULT_DIR else f" --dir {stack.dir}"
        typer.echo(f"stack up in {stack.dir}; stop it with `wmpo stack down{hint}`", err=True)
        return
    _stay_attached(stack)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _stay_attached(stack: Stack) -> None:
    """Report services that exit; on Ctrl-C/SIGTERM (or once every service has exited) bring the stack down."""
    _say("running in the foreground; Ctrl-C stops it")
    reported: set[str] = set()
    try:
        while True:
            time.sleep(1.0)
            records = [r for r in stack.records() if r.pid is not None]
            for record in records:
                if record.name not in reported and not record.alive():
                    reported.add(record.name)
                    _say(f"{record.name} exited (log: {record.log})")
            if not records or all(r.name in reported for r in records):
                break
    except KeyboardInterrupt:
        pass
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # let the shutdown finish
    _finish_down(stack.down())


def _finish_down(result: StackDown) -> None:
    _say(f"stopped {', '.join(result.stopped)}" if result.stopped else "nothing was running")
    if result.survivors:
        raise UserError(f"could not stop {', '.join(result.survivors)}; see `wmpo stack status`")
    if result.busy_ports:
        raise UserError(f"port(s) {', '.join(map(str, result.busy_ports))} are still in use by other processes")


@app.command()
def down(dir_: DirOpt = None, config_file: ConfigOpt = None) -> None:
    """Stop every service (reverse order, SIGTERM then SIGKILL) and check that their ports are free."""
    stack = Stack(StackSettings.load(config_file, dir=dir_), progress=_say)
    if not stack.records():
        _say(f"no stack in {stack.dir}")
        return
    _finish_down(stack.down())


@app.command()
def status(
    dir_: DirOpt = None,
    config_file: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """One table of the stack's services: pid, health, address, uptime, log. Exit 1 unless all are healthy."""
    stack = Stack(StackSettings.load(config_file, dir=dir_))
    statuses = stack.status()
    if as_json:
        typer.echo(json.dumps([s.to_json() for s in statuses]))
    elif statuses:
        _print_table(statuses)
    else:
        _say(f"no stack in {stack.dir}")
    if not statuses or not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@app.command()
def logs(
    service: Annotated[str | None, typer.Argument(help="redis, dream, policy, worker-N (or worker), api.")] = None,
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, help="Lines to show from the end.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    dir_: DirOpt = None,
    config_file: ConfigOpt = None,
) -> None:
    """Show (and follow) the services' logs, prefixed with the service name when there are several."""
    stack = Stack(StackSettings.load(config_file, dir=dir_))
    files = _log_files(stack, service)
    prefix = len(files) > 1
    for name, path in files.items():
        for line in read_tail(path, lines):
            typer.echo(f"{name:<9}| {line}" if prefix else line)
    if follow:
        _follow(files, prefix)


def _log_files(stack: Stack, service: str | None) -> dict[str, Path]:
    known = {r.name: Path(r.log) for r in stack.records()}
    for path in sorted(stack.logs_dir.glob("*.log")):
        known.setdefault(path.stem, path)
    if service is None:
        if not known:
            raise UserError(f"no logs in {stack.dir}")
        return known
    wanted = ALIASES.get(service, service)
    chosen = {n: p for n, p in known.items() if n == wanted or n.split("-")[0] == wanted}
    if not chosen:
        raise UserError(f"no logs for {service!r} in {stack.dir} (services: {', '.join(known) or 'none'})")
    return chosen


def _follow(files: dict[str, Path], prefix: bool) -> None:
    offsets = {n: p.stat().st_size if p.exists() else 0 for n, p in files.items()}
    partial = dict.fromkeys(files, "")
    try:
        while True:
            for name, path in files.items():
                try:
                    with path.open("rb") as fh:
                        fh.seek(offsets[name])
                        data = fh.read()
                except OSError:
                    continue
                offsets[name] += len(data)
                *complete, partial[name] = (partial[name] + data.decode("utf-8", errors="replace")).split("\n")
                for line in complete:
                    typer.echo(f"{name:<9}| {line}" if prefix else line)
            time.sleep(0.3)
    except KeyboardInterrupt:
        return


def _print_table(statuses: Sequence[ServiceStatus]) -> None:
    from rich.console import Console
    from rich.table import Table

    colors = {"healthy": "green", "unhealthy": "yellow", "exited": "red", "stopped": "dim"}
    table = Table(title_justify="left")
    for column in ("service", "pid", "state", "address", "uptime", "log"):
        table.add_column(column, overflow="fold")
    for s in statuses:
        table.add_row(s.name, str(s.pid or "-"), f"[{colors[s.state]}]{s.state}[/]", s.address,
                      _duration(s.uptime_s), s.log)  # fmt: skip
    Console(width=160).print(table)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
