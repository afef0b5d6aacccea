"""The MetaWorld tasks wmpo supports, each with its language instruction and horizon."""

from __future__ import annotations

from dataclasses import dataclass

from wmpo.common.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    """A task: its MetaWorld environment, the instruction the policy gets, and the step limit."""

    name: str
    env_name: str
    instruction: str
    max_steps: int


# Horizons leave ~1.5x the scripted expert's longest episode (measured over 20 seeds: button-press
# 56-63 steps, drawer-open 86-92, reach 35-68, push 48-72).
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("button-press", "button-press-v3", "press the button", 100),
        TaskSpec("drawer-open", "drawer-open-v3", "open the drawer", 140),
        TaskSpec("reach", "reach-v3", "reach the red goal", 100),
        TaskSpec("push", "push-v3", "push the puck to the goal", 110),
    )
}

EVAL_SEED_OFFSET = 1_000_000
"""Evaluation seeds start here; data collection and training use seeds below it (honest evaluation)."""


def get_task(name: str) -> TaskSpec:
    """The task called `name`, or a `UserError` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
