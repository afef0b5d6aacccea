"""World-model checkpoint directories: the (EMA) weights and config, ``wmpo_worldmodel.json``, and ``training/``
state for resume (`wmpo.common.training_state`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wmpo.common.errors import UserError
from wmpo.common.fsutil import atomic_directory
from wmpo.common.training_state import TRAINING_DIR
from wmpo.worldmodel.model import WorldModel

MARKER_FILE = "wmpo_worldmodel.json"


def save_world_model(model: WorldModel, path: Path, info: dict[str, Any]) -> Path:
    """Write `model` to `path` atomically, keeping an existing ``training/`` subdirectory."""
    with atomic_directory(path, keep=(TRAINING_DIR,)) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / MARKER_FILE).write_text(json.dumps({"format": "wmpo-worldmodel", **info}, indent=2, sort_keys=True))
    return path


def load_world_model(path: Path | str, device: str = "cpu") -> tuple[WorldModel, dict[str, Any]]:
    """Load a checkpoint directory (`UserError` in one line when it is not one)."""
    root = Path(path)
    marker = root / MARKER_FILE
    if not marker.is_file():
        raise UserError(f"{root} is not a wmpo world-model checkpoint (no {MARKER_FILE})")
    try:
        model = WorldModel.from_pretrained(str(root), low_cpu_mem_usage=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load world-model checkpoint {root}: {exc}".splitlines()[0]) from None
    model.to(device).eval()
    info: dict[str, Any] = json.loads(marker.read_text())
    return model, info
