"""`wmpo demo` (= `make demo`): the typer command that runs the demo pipeline, and its summary table."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from wmpo.common.cli import check_device
from wmpo.demo.pipeline import PROFILES, Demo

app = typer.Typer(help="Run WMPO end to end on the local stack and write a report.")


@app.callback(invoke_without_command=True)
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="A ~3-minute smoke version (tiny everything).")] = False,
    out: Annotated[Path, typer.Option(help="Where the report goes (index.html, report.json).")] = Path("demo-report"),
    work: Annotated[
        Path | None, typer.Option(help="Work directory, the cache (default wmpo-data/demo[-quick]).")
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard the cache and start over.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (training and serving).")] = "cpu",
) -> None:
    """Collect data, train base policy/world model/reward model, run WMPO on the local stack, evaluate, report."""
    check_device(device)
    profile = PROFILES["quick" if quick else "full"]
    work = work or Path("wmpo-data/demo-quick" if quick else "wmpo-data/demo")
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    report = Demo(profile, work, out, device).run()
    _summary(report, out)


def _summary(report: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    base, final = report["eval"]["base"], report["eval"]["final"]
    table = Table(title=f"WMPO demo ({report['profile']['name']}, task {report['task']})")
    table.add_column("what")
    table.add_column("value", justify="right")

    def rate(e: dict[str, Any]) -> str:
        return f"{e['success_rate']:.0%}  [{e['ci95_low']:.0%}, {e['ci95_high']:.0%}]  (n={e['episodes']})"

    iterations = report["wmpo"]["iterations"]
    table.add_row(f"real success, base policy v{base['version']}", rate(base))
    table.add_row(f"real success, final policy v{final['version']}", rate(final))
    if iterations:
        table.add_row(
            "imagined success, first → last iteration",
            f"{iterations[0]['imagined_success_rate']:.0%} → {iterations[-1]['imagined_success_rate']:.0%}",
        )
    table.add_row("imagined episodes", str(report["wmpo"]["episodes"]))
    table.add_row(
        "reward model AUROC (held-out clips)", f"{report['reward']['metrics'].get('auroc', float('nan')):.3f}"
    )
    table.add_row("wall time", f"{report['wall_s'] / 60:.1f} min")
    table.add_row("report", str(out / "index.html"))
    Console(stderr=True).print(table)
