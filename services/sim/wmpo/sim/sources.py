"""Where actions come from in the simulator: the scripted expert, a random policy, a policy server, or
a local checkpoint. `SourceSpec` is the picklable description worker processes build a source from.

SOURCE strings (as `wmpo eval --policy` takes them):
- ``expert``: MetaWorld's scripted expert (optionally with Gaussian action noise);
- ``random``: uniform actions in [-1, 1];
- ``grpc://host:port`` or ``grpcs://host:port``, optionally ``?version=N`` (or an alias): a policy server;
- a checkpoint directory: loaded by the policy package's ``wmpo.policy_sources`` entry point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import numpy as np

from wmpo.common.errors import UserError
from wmpo.common.seeds import step_seed
from wmpo.common.tensors import Array
from wmpo.sim.env import ACTION_DIM, MetaWorldEnv, SimObservation

SOURCE_ENTRY_POINTS = "wmpo.policy_sources"


class ActionSource(Protocol):
    """Gives the next actions for an observation: a chunk [n, A], executed open loop."""

    label: str

    def reset(self, seed: int) -> None: ...

    def act(self, env: MetaWorldEnv, observation: SimObservation) -> Array: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SourceSpec:
    """A picklable description of an action source (see the module doc for `source`)."""

    source: str
    noise: float = 0.0
    temperature: float = 0.0
    version: str = ""
    token: str | None = None
    device: str = "cpu"

    def kind(self) -> str:
        if self.source in ("expert", "random"):
            return self.source
        if self.source.startswith(("grpc://", "grpcs://")):
            return "grpc"
        return "checkpoint"

    def validate(self) -> None:
        """Fail fast, in the parent process, with one readable line."""
        if self.noise < 0 or not np.isfinite(self.noise):
            raise UserError(f"--noise must be a finite number >= 0, got {self.noise}")
        if self.kind() == "checkpoint" and not Path(self.source).is_dir():
            raise UserError(
                f"policy source {self.source!r} is neither expert, random, grpc://host:port nor a checkpoint directory"
            )


class ExpertSource:
    """MetaWorld's scripted expert, with optional Gaussian noise (std `noise`) to obtain failures too."""

    def __init__(self, noise: float = 0.0) -> None:
        self.noise = noise
        self.label = "expert" if noise == 0 else f"expert+noise{noise:g}"
        self._rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        self._rng = np.random.default_rng([seed, 1])

    def act(self, env: MetaWorldEnv, observation: SimObservation) -> Array:
        action = env.expert_action(observation)
        if self.noise > 0:
            action = action + self._rng.normal(0.0, self.noise, size=action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)[None]

    def close(self) -> None:
        pass


class RandomSource:
    """Uniform random actions in [-1, 1]."""

    label = "random"

    def __init__(self) -> None:
        self._rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        self._rng = np.random.default_rng([seed, 2])

    def act(self, env: MetaWorldEnv, observation: SimObservation) -> Array:
        return self._rng.uniform(-1.0, 1.0, size=(1, ACTION_DIM)).astype(np.float32)

    def close(self) -> None:
        pass


class RemotePolicySource:
    """A policy server queried like a robot does, one action chunk per call.

    The simulator renders one view; it is sent under the camera name the policy asks for (`camera()`),
    looked up once per episode (so a new current version is followed between episodes).
    """

    def __init__(self, address: str, *, version: str = "", token: str | None = None, temperature: float = 0.0) -> None:
        from wmpo.robot import PolicyClient

        parts = urlsplit(address)
        query = parse_qs(parts.query)
        self.version = version or (query.get("version", [""])[0])
        self.client = PolicyClient(
            f"{parts.scheme}://{parts.netloc}", token=token or os.environ.get("WMPO_POLICY_TOKEN")
        )
        self.temperature = temperature
        self.label = f"policy:{self.version or 'current'}"
        self._seed = 0
        self._calls = 0
        self._camera: str | None = None

    def reset(self, seed: int) -> None:
        self._seed, self._calls, self._camera = seed, 0, None

    def act(self, env: MetaWorldEnv, observation: SimObservation) -> Array:
        self._calls += 1
        if self._camera is None:
            self._camera = self.client.camera(self.version)
        chunk = self.client.act(
            {self._camera: observation.image},
            observation.instruction,
            observation.proprio,
            version=self.version,
            temperature=self.temperature,
            seed=step_seed(self._seed, self._calls) if self.temperature > 0 else None,
        )
        self.label = f"policy:{chunk.policy_version}"
        if chunk.actions.shape[1] != ACTION_DIM:
            raise UserError(f"the policy answers {chunk.actions.shape[1]}-D actions; this simulator takes {ACTION_DIM}")
        return np.asarray(chunk.actions)

    def close(self) -> None:
        self.client.close()


def build_source(spec: SourceSpec) -> ActionSource:
    """Instantiate the source `spec` describes (in the process that will use it)."""
    kind = spec.kind()
    if kind == "expert":
        return ExpertSource(spec.noise)
    if kind == "random":
        return RandomSource()
    if kind == "grpc":
        return RemotePolicySource(spec.source, version=spec.version, token=spec.token, temperature=spec.temperature)
    loaders = {ep.name: ep for ep in metadata.entry_points(group=SOURCE_ENTRY_POINTS)}
    if "checkpoint" not in loaders:
        raise UserError(
            f"{spec.source} is a directory, but no policy package is installed to load checkpoints "
            "(install `wmpo[policy]`)"
        )
    loader: Any = loaders["checkpoint"].load()
    source: ActionSource = loader(spec)
    return source
