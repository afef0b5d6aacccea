"""`wmpo demo`: WMPO end to end on the local stack (being built)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Run WMPO end to end on the local stack and write a report.")
