"""`wmpo stack up|down|status|logs`: the real services as local processes (being built)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Run the wmpo services as local processes.", no_args_is_help=True)
