"""`wmpo trainer ...` sub-commands (registered through the ``wmpo.cli`` entry-point group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wmpo.common.cli import add_config_command
from wmpo.trainer.settings import TrainerSettings

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML settings file (a `trainer:` section).")]

app = typer.Typer(help="WMPO training: rollout workers, the GRPO learner, the control plane.", no_args_is_help=True)
add_config_command(app, TrainerSettings)


@app.command()
def worker(
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL of the job queue.")] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="Policy service, grpc://host:port.")] = None,
    dream: Annotated[str | None, typer.Option("--dream", help="Triton gRPC address host:port (dream, reward).")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Episodes run at once.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port (0: off).")] = None,
    name: Annotated[str | None, typer.Option(help="Consumer name in the queue (default: host-pid).")] = None,
    max_jobs: Annotated[
        int | None, typer.Option(min=1, help="Exit after this many jobs (default: run forever).")
    ] = None,
    config_file: ConfigOpt = None,
) -> None:
    """A rollout worker: episodes from the Redis queue (dream: policy <-> world model; sim: policy <-> the simulator,
    which needs no Triton), results back."""
    from wmpo.trainer.rollout.runner import run_worker

    settings = TrainerSettings.load(
        config_file,
        redis_url=redis,
        policy_address=policy,
        dream_address=dream,
        worker_concurrency=concurrency,
        metrics_port=metrics_port,
    )
    run_worker(settings, name=name, max_jobs=max_jobs)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port to listen on.")] = None,
    runs_dir: Annotated[Path | None, typer.Option("--runs-dir", help="Folder of the runs.")] = None,
    registry: Annotated[Path | None, typer.Option("--registry", help="Version registry root.")] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="Redis URL (health, registry notices).")] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="File whose first token guards the POST endpoints.")
    ] = None,
    config_file: ConfigOpt = None,
) -> None:
    """The control plane: HTTP API and dashboard for runs and versions (OpenAPI docs at /docs)."""
    from wmpo.trainer.control.app import serve_api

    settings = TrainerSettings.load(
        config_file,
        api_host=host,
        api_port=port,
        runs_dir=runs_dir,
        registry_dir=registry,
        redis_url=redis,
        api_token_file=token_file,
    )
    serve_api(settings)


train_app = typer.Typer(
    help="Run WMPO training (GRPO in the world model, or online in the simulator) from a run config."
)


@train_app.callback(invoke_without_command=True)
def train(
    config_file: Annotated[Path, typer.Option("--config", help="RUN.yaml: `trainer:` and `run:` sections.")],
    run_id: Annotated[
        str | None, typer.Option(help="Run id (default: the config file's name); the same id resumes the run.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run WMPO: GRPO iterations through the rollout workers (run.environment: dream or sim), publishing a policy
    version each."""
    from wmpo.common.cli import check_device
    from wmpo.common.metrics import serve_metrics
    from wmpo.trainer.learner import Learner, load_run

    settings, config, rid, text = load_run(config_file, run_id)
    check_device(config.device)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port)
    learner = Learner(settings, config, rid, text, progress=progress)
    state = learner.run()
    record = learner.store.get(rid)
    kind = "imagined" if config.environment == "dream" else "sim"
    budget = "" if config.real_episode_budget is None else f" of a budget of {config.real_episode_budget}"
    typer.echo(
        f"run {rid}: {record.status} after {state.iteration}/{config.iterations} iterations, "
        f"policy version {state.policy_version} ({state.episodes} {kind} episodes, "
        f"{state.real_episodes} real episodes{budget})"
    )
