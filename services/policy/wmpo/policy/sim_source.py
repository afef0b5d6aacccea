"""A checkpoint directory as an action source for the simulator (`wmpo eval --policy CKPT_DIR`).

Registered under the ``wmpo.policy_sources`` entry point so `wmpo.sim` needs no import of this package.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wmpo.common.seeds import step_seed
from wmpo.common.tensors import Array
from wmpo.policy.checkpoint import load_policy


class CheckpointSource:
    """Runs a local `PolicyBundle` in-process, one action chunk per call, executed open loop."""

    def __init__(self, path: str, *, device: str = "cpu", temperature: float = 0.0) -> None:
        self.bundle = load_policy(path, device=device)
        self.temperature = temperature
        self.label = f"checkpoint:{path}"
        self._seed = 0
        self._calls = 0

    def reset(self, seed: int) -> None:
        self._seed, self._calls = seed, 0

    def act(self, env: Any, observation: Any) -> Array:
        self._calls += 1
        inputs = self.bundle.prepare(
            [{self.bundle.camera_names[0]: observation.image}], [observation.proprio], [observation.instruction]
        )
        seed = step_seed(self._seed, self._calls) if self.temperature > 0 else None
        out = self.bundle.act(inputs, [self.temperature], [seed])
        return np.asarray(out.actions[0], np.float32)

    def close(self) -> None:
        pass


def load_checkpoint_source(spec: Any) -> CheckpointSource:
    """Entry point: build a `CheckpointSource` from a `wmpo.sim.sources.SourceSpec`."""
    return CheckpointSource(spec.source, device=spec.device, temperature=spec.temperature)
