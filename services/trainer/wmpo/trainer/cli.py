"""`wmpo trainer ...` sub-commands (registered through the ``wmpo.cli`` entry-point group)."""

from __future__ import annotations

import typer

from wmpo.common.cli import add_config_command
from wmpo.trainer.settings import TrainerSettings

app = typer.Typer(help="WMPO training: rollout workers, the GRPO learner, the control plane.", no_args_is_help=True)
add_config_command(app, TrainerSettings)

train_app = typer.Typer(help="Run WMPO training (GRPO in the world model) from a run config.")
