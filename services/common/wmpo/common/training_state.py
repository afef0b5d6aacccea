"""A checkpoint's training state: ``<checkpoint>/training/`` holds what a resumed run needs and is never published.

``state.pt`` (the step, optimizer state, loss history; plain tensors and numbers, so it loads with
``weights_only=True``), ``config.json`` (the hyper-parameters of the last run) and ``log.jsonl`` (one line
per save). Rewriting a checkpoint with `wmpo.common.fsutil.atomic_directory(..., keep=(TRAINING_DIR,))`
carries the folder over; the registry leaves it out when publishing. torch is imported inside the functions:
this package stays light.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from wmpo.common.fsutil import atomic_write_text

TRAINING_DIR = "training"
STATE_FILE = "state.pt"


def load_training_state(checkpoint: Path, device: str = "cpu") -> dict[str, Any] | None:
    """The state saved under `checkpoint` by `save_training_state`, on `device`; None when there is none."""
    path = checkpoint / TRAINING_DIR / STATE_FILE
    if not path.is_file():
        return None
    return load_tensors(path, device)


def save_training_state(
    checkpoint: Path, state: dict[str, Any], *, config: dict[str, Any], log: dict[str, Any]
) -> None:
    """Write `state` (atomically), the run's `config`, and append `log` as one line of ``log.jsonl``."""
    training = checkpoint / TRAINING_DIR
    save_tensors(training / STATE_FILE, state)
    atomic_write_text(training / "config.json", json.dumps(config, indent=2))
    with (training / "log.jsonl").open("a") as fh:
        fh.write(json.dumps(log) + "\n")


def save_tensors(path: Path, state: dict[str, Any]) -> None:
    """`torch.save` `state` to `path` atomically (temporary file, fsync, rename): a crash leaves the old file."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def load_tensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """What `save_tensors` wrote, on `device`; only tensors, numbers and containers load (``weights_only``)."""
    import torch

    state: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    return state
