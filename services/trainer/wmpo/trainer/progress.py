"""Progress bars for the training loops the trainer drives (BC, world model, reward model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def advance_to(bar: Any) -> Callable[..., None]:
    """A training loop's ``on_step(step, ...)`` callback that moves a tqdm bar to `step` (resumed runs jump)."""

    def on_step(step: int, *_rest: object) -> None:
        bar.update(step - bar.n)

    return on_step
