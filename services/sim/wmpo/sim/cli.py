"""`wmpo data collect|info`, `wmpo eval` and `wmpo eval compare`: collecting trajectories, evaluating policies for
real, and comparing two evaluations on the same seeds (paired statistics, `wmpo.sim.stats`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm import tqdm

from wmpo.common.errors import UserError
from wmpo.data.dataset import TrajectoryDataset
from wmpo.sim.tasks import EVAL_SEED_OFFSET, TASKS, get_task

data_app = typer.Typer(help="Trajectory data: collect it in the simulator, inspect it.", no_args_is_help=True)
eval_app = typer.Typer(
    help="Evaluate a policy in the real simulator (`wmpo eval --policy P --task T`), or compare two evaluations "
    "on the same seeds (`wmpo eval compare A.json B.json`)."
)

TaskOpt = Annotated[str, typer.Option("--task", help=f"One of: {', '.join(TASKS)}.")]
ImageSizeOpt = Annotated[int, typer.Option(min=16, max=512, help="Camera image height and width.")]
CameraOpt = Annotated[str, typer.Option(help="MetaWorld camera: corner, corner2, corner3, topview, behindGripper.")]


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@data_app.command()
def collect(
    task: TaskOpt,
    episodes: Annotated[int, typer.Option(min=1, help="How many episodes to collect.")],
    out: Annotated[Path, typer.Option(help="Dataset folder (created, or appended to).")],
    noise: Annotated[float, typer.Option(min=0.0, help="Std of Gaussian noise on expert actions.")] = 0.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the first episode; episode i uses seed+i.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Parallel simulator processes.")] = _default_workers(),
    image_size: ImageSizeOpt = 64,
    camera: CameraOpt = "corner",
    steps_after_success: Annotated[
        int, typer.Option(min=0, help="Steps recorded after the first success (positives for the reward model).")
    ] = 8,
) -> None:
    """Run the scripted expert (with optional action noise) and append its episodes to a dataset."""
    from wmpo.sim.rollout import run_many
    from wmpo.sim.sources import SourceSpec

    spec_task = get_task(task)
    if seed + episodes > EVAL_SEED_OFFSET:
        raise UserError(f"seeds from {EVAL_SEED_OFFSET} on are reserved for evaluation; use a smaller --seed")
    source = SourceSpec("expert", noise=noise)
    source.validate()
    successes = 0
    bar = tqdm(total=episodes, desc=f"collect {task}", unit="ep")
    for result in run_many(spec_task, source, range(seed, seed + episodes), workers=workers, image_size=image_size,
                           camera=camera, out_dir=out, steps_after_success=steps_after_success):  # fmt: skip
        successes += result.success
        bar.update()
        bar.set_postfix(success=f"{successes}/{bar.n}")
    bar.close()
    typer.echo(f"wrote {episodes} episodes to {out} ({successes} successful)")


@data_app.command()
def info(
    path: Annotated[Path, typer.Argument(help="Dataset folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verify: Annotated[bool, typer.Option(help="Read every episode whole to check its checksums.")] = True,
) -> None:
    """Episodes, steps, success rate, tasks and sources of a dataset, and any unreadable files."""
    if not path.is_dir():
        raise UserError(f"{path} is not a dataset folder")
    summary = TrajectoryDataset(path, verify=verify, cache=False).summary()
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), sort_keys=True))
        return
    typer.echo(f"dataset   {path}")
    typer.echo(f"episodes  {summary.episodes}")
    typer.echo(f"steps     {summary.steps}")
    typer.echo(f"success   {summary.successes}/{summary.episodes} ({summary.success_rate:.1%})")
    typer.echo(f"tasks     {', '.join(f'{k} ({v})' for k, v in sorted(summary.tasks.items())) or '-'}")
    typer.echo(f"sources   {', '.join(f'{k} ({v})' for k, v in sorted(summary.sources.items())) or '-'}")
    typer.echo(f"images    {', '.join('x'.join(map(str, s)) for s in summary.image_shapes) or '-'}")
    for bad, reason in summary.problems:
        typer.echo(f"skipped   {bad}: {reason}")


@eval_app.callback(invoke_without_command=True)
def evaluate_command(
    ctx: typer.Context,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="expert, random, grpc://host:port[?version=N], or a checkpoint dir. Required.",
            show_default=False,
        ),
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help=f"One of: {', '.join(TASKS)}. Required.", show_default=False)
    ] = None,
    episodes: Annotated[int, typer.Option(min=1, help="Episodes to run.")] = 20,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON (per-seed outcomes included).")
    ] = False,
    video: Annotated[Path | None, typer.Option("--video", help="Write GIFs of the first episodes here.")] = None,
    videos: Annotated[int, typer.Option(min=0, help="How many episodes to film with --video.")] = 3,
    version: Annotated[str, typer.Option(help="Policy version or alias for grpc:// sources.")] = "",
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature (0 = greedy).")] = 0.0,
    seed: Annotated[int, typer.Option(help="First evaluation seed (disjoint from training seeds).")] = EVAL_SEED_OFFSET,
    workers: Annotated[int, typer.Option(min=1, help="Parallel simulator processes.")] = _default_workers(),
    image_size: ImageSizeOpt = 64,
    camera: CameraOpt = "corner",
    device: Annotated[str, typer.Option(help="Torch device for checkpoint policies.")] = "cpu",
) -> None:
    """Success rate (95% Wilson interval) and mean episode length of a policy in the simulator."""
    if ctx.invoked_subcommand is not None:  # `wmpo eval compare ...`: nothing to evaluate here
        if policy is not None or task is not None:
            raise UserError(f"`wmpo eval {ctx.invoked_subcommand}` takes no --policy or --task")
        return
    # Required when evaluating, but not declared required, so that sub-commands run without them: the same
    # usage error (exit 2) as a missing required option.
    if policy is None:
        ctx.fail("Missing option '--policy'.")
    if task is None:
        ctx.fail("Missing option '--task'.")
    from wmpo.sim.evaluate import evaluate
    from wmpo.sim.sources import SourceSpec

    spec_task = get_task(task)
    source = SourceSpec(policy, temperature=temperature, version=version, device=device)
    source.validate()
    if seed < EVAL_SEED_OFFSET:
        typer.echo(f"warning: seeds below {EVAL_SEED_OFFSET} overlap the training seeds", err=True)
    render = source.kind() not in ("expert", "random")  # experts and random need no pixels, except for videos
    bar = tqdm(total=episodes, desc=f"eval {policy} on {task}", unit="ep", disable=as_json)
    report = evaluate(
        spec_task, source, episodes, seed=seed, workers=workers, image_size=image_size, camera=camera,
        video_dir=video, videos=videos, render=render, on_episode=lambda _r: bar.update(),
    )  # fmt: skip
    bar.close()
    if as_json:
        typer.echo(json.dumps(report.as_dict(), sort_keys=True))
        return
    typer.echo(
        f"{report.task}: {report.policy} succeeded {report.successes}/{report.episodes} = {report.success_rate:.1%} "
        f"(95% CI {report.ci95_low:.1%}-{report.ci95_high:.1%}), mean episode length {report.mean_length:.1f}"
    )
    for path in report.videos:
        typer.echo(f"video: {path}")


def _read_eval_report(path: Path) -> tuple[dict[str, Any], dict[int, bool]]:
    """A `wmpo eval --json` report and its per-seed outcomes, or a one-line UserError."""
    from wmpo.sim.stats import outcomes_from_report

    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (expected a `wmpo eval --json` report)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a `wmpo eval --json` report ({type(exc).__name__}: {exc})") from None
    try:
        outcomes = outcomes_from_report(report)
        if not isinstance(report.get("task"), str) or not isinstance(report.get("policy"), str):
            raise ValueError("not a `wmpo eval` report (no task or policy)")
    except ValueError as exc:
        raise UserError(f"{path} is {exc}") from None
    return report, outcomes


@eval_app.command(
    "compare", short_help="Paired comparison of two `wmpo eval --json` reports on the same task and seeds."
)
def compare_command(
    first: Annotated[
        Path,
        typer.Argument(metavar="A.json", help="Report A (the output of `wmpo eval ... --json`).", show_default=False),
    ],
    second: Annotated[
        Path, typer.Argument(metavar="B.json", help="Report B, on the same task and seeds.", show_default=False)
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compare two evaluations seed by seed: both success rates with 95% Wilson intervals, the difference A - B
    with Newcombe's 95% interval for paired proportions, and the exact McNemar p-value.

    The reports must be on the same task and the same seeds (`wmpo eval --seed S --episodes N` for both)."""
    from wmpo.sim.stats import PairedComparison

    report_a, outcomes_a = _read_eval_report(first)
    report_b, outcomes_b = _read_eval_report(second)
    if report_a["task"] != report_b["task"]:
        raise UserError(
            f"{first} is on task {report_a['task']!r} but {second} on {report_b['task']!r}: "
            "a paired comparison needs the same task and seeds"
        )
    try:
        cmp = PairedComparison.from_outcomes(outcomes_a, outcomes_b, names=(str(first), str(second)))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        arms = {"report_a": (first, report_a), "report_b": (second, report_b)}
        info = {k: {"file": str(path), "policy": r["policy"]} for k, (path, r) in arms.items()}
        typer.echo(json.dumps({"task": report_a["task"], **info, **cmp.as_dict()}, sort_keys=True))
        return
    seeds = sorted(outcomes_a)
    span = f"seeds {seeds[0]}-{seeds[-1]}" if seeds else "no seeds"
    typer.echo(f"{report_a['task']}: {cmp.n} paired episodes ({span})")
    for label, path, report, wins, rate, (low, high) in (
        ("A", first, report_a, cmp.successes_a, cmp.rate_a, cmp.ci_a),
        ("B", second, report_b, cmp.successes_b, cmp.rate_b, cmp.ci_b),
    ):
        typer.echo(
            f"{label}  {report['policy']} ({path}): {wins}/{cmp.n} = {rate:.1%} (95% Wilson CI {low:.1%}-{high:.1%})"
        )
    low, high = cmp.ci_difference
    typer.echo(
        f"A - B  {cmp.difference:+.1%} (95% Newcombe CI {low:+.1%} to {high:+.1%}); "
        f"only A solved {cmp.b}, only B solved {cmp.c}; exact McNemar p = {cmp.p_value:.4g}"
    )
