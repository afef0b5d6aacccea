"""`wmpo worldmodel ...` sub-commands (registered through the ``wmpo.cli`` entry-point group)."""

from __future__ import annotations

import typer

from wmpo.common.cli import add_config_command
from wmpo.worldmodel.settings import WorldModelServiceSettings

app = typer.Typer(
    help="The world model and reward model: training, Triton serving, Imagination API.", no_args_is_help=True
)
add_config_command(app, WorldModelServiceSettings)
