"""`wmpo policy ...` sub-commands (registered through the ``wmpo.cli`` entry-point group)."""

from __future__ import annotations

import typer

from wmpo.common.cli import add_config_command
from wmpo.policy.settings import PolicyServiceSettings

app = typer.Typer(help="The VLA policy: training and the gRPC policy server.", no_args_is_help=True)
add_config_command(app, PolicyServiceSettings)
