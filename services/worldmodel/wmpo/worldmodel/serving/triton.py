"""Triton serving of the world model (`dream`) and the reward model (`reward`) through PyTriton.

`dream`: context uint8 [K, H, W, C] + actions float32 [F, A] + seed int64 [1] -> frames uint8 [F, H, W, C]
and model_version int64 [1]. `reward`: clip uint8 [N, H, W, C] -> probability float32 [1]. Both batch
dynamically (max batch and queue delay configurable). The checkpoint's registry version is the Triton model
version in the metadata; with a registry, a newly published world-model version is loaded in the
background and swapped in without restarting Triton (its number is then reported by `model_version`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmpo.common.logs import get_logger
from wmpo.common.registry import Registry, VersionNotFoundError
from wmpo.common.tensors import Array
from wmpo.common.triton import TritonPorts, start_triton
from wmpo.worldmodel.checkpoint import load_world_model
from wmpo.worldmodel.model import WorldModel, to_model_frames, to_uint8_frames
from wmpo.worldmodel.reward.checkpoint import load_reward_model
from wmpo.worldmodel.reward.model import RewardModel
from wmpo.worldmodel.serving.client import REWARD_MODEL_NAME, WORLD_MODEL_NAME

log = get_logger(__name__)


@dataclass
class Loaded:
    model: WorldModel
    version: int


class ServedModels:
    """The models Triton serves; `swap` replaces the world model atomically between batches."""

    def __init__(
        self,
        world: WorldModel,
        reward: RewardModel,
        *,
        version: int = 1,
        reward_version: int = 0,
        sampler_steps: int = 3,
    ) -> None:
        self._world = Loaded(world, version)
        self.reward = reward
        self.reward_version = reward_version
        self.sampler_steps = sampler_steps
        self._lock = threading.Lock()

    @property
    def world(self) -> Loaded:
        return self._world

    def swap(self, world: WorldModel, version: int) -> None:
        with self._lock:
            self._world = Loaded(world, version)

    def swap_reward(self, reward: RewardModel, version: int) -> None:
        """Replace the reward model (a policy-behaviour alignment publishes a fine-tuned one)."""
        with self._lock:
            self.reward = reward
            self.reward_version = version

    def imagine(self, context: Array, actions: Array, seeds: Array) -> tuple[Array, Array]:
        """Batched: context [B,K,H,W,C] uint8, actions [B,F,A], seeds [B,1] -> frames [B,F,H,W,C], version [B,1]."""
        loaded = self._world
        model = loaded.model
        device = next(model.parameters()).device
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds.reshape(-1)]
        ctx = to_model_frames(torch.from_numpy(np.ascontiguousarray(context))).to(device)
        acts = torch.from_numpy(np.ascontiguousarray(actions, dtype=np.float32)).to(device)
        frames = model.sample(ctx, acts, steps=self.sampler_steps, generator=generators)
        versions = np.full((len(seeds), 1), loaded.version, np.int64)
        return to_uint8_frames(frames).cpu().numpy(), versions

    def reward_probability(self, clips: Array) -> Array:
        """Batched: clips [B,N,H,W,C] uint8 -> P(success) [B,1]."""
        return self.reward.probability(clips).reshape(-1, 1).astype(np.float32)


def bind_models(triton: Any, models: ServedModels, *, max_batch_size: int, max_queue_delay_us: int) -> None:
    """Bind `dream` and `reward` to a PyTriton server with dynamic batching."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    cfg = models.world.model.config
    batcher = DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us)

    @batch  # type: ignore[untyped-decorator]
    def infer_world_model(context: Array, actions: Array, seed: Array) -> dict[str, Array]:
        frames, versions = models.imagine(context, actions, seed)
        return {"frames": frames, "model_version": versions}

    @batch  # type: ignore[untyped-decorator]
    def infer_reward(clip: Array) -> dict[str, Array]:
        return {"probability": models.reward_probability(clip)}

    size, channels = int(cfg.image_size), int(cfg.channels)
    triton.bind(
        model_name=WORLD_MODEL_NAME,
        model_version=models.world.version,
        infer_func=infer_world_model,
        inputs=[
            Tensor(name="context", dtype=np.uint8, shape=(int(cfg.context_frames), size, size, channels)),
            Tensor(name="actions", dtype=np.float32, shape=(int(cfg.future_frames), int(cfg.action_dim))),
            Tensor(name="seed", dtype=np.int64, shape=(1,)),
        ],
        outputs=[
            Tensor(name="frames", dtype=np.uint8, shape=(int(cfg.future_frames), size, size, channels)),
            Tensor(name="model_version", dtype=np.int64, shape=(1,)),
        ],
        config=ModelConfig(max_batch_size=max_batch_size, batcher=batcher),
        strict=True,
    )
    triton.bind(
        model_name=REWARD_MODEL_NAME,
        infer_func=infer_reward,
        inputs=[Tensor(name="clip", dtype=np.uint8, shape=(models.reward.clip_len, size, size, channels))],
        outputs=[Tensor(name="probability", dtype=np.float32, shape=(1,))],
        config=ModelConfig(max_batch_size=max_batch_size, batcher=batcher),
        strict=True,
    )


class WorldModelWatcher:
    """Polls the `worldmodel` (and, when given, `reward`) registries and swaps newly published versions in.

    A version that fails its sha256 or does not load is refused (and remembered); the previous one keeps
    serving.
    """

    def __init__(
        self,
        models: ServedModels,
        registry: Registry,
        device: str,
        interval_s: float = 2.0,
        reward_registry: Registry | None = None,
    ) -> None:
        self.models, self.registry, self.device, self.interval_s = models, registry, device, interval_s
        self.reward_registry = reward_registry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="worldmodel-watch")
        self.refused: dict[int, str] = {}
        self.refused_reward: dict[int, str] = {}

    def start(self) -> WorldModelWatcher:
        self._thread.start()
        return self

    def refresh(self) -> bool:
        """Swap in new versions; True if anything changed.

        The reward model goes first: alignment publishes it before the world model, so a client that sees
        the new world-model version in `dream` answers also gets the new reward model.
        """
        changed = False
        if self.reward_registry is not None:
            changed = self._refresh(
                self.reward_registry, self.models.reward_version, self.refused_reward, "reward-model",
                lambda path: load_reward_model(path, self.device), self.models.swap_reward,
            )  # fmt: skip
        world = self._refresh(
            self.registry, self.models.world.version, self.refused, "world-model",
            lambda path: load_world_model(path, self.device)[0], self.models.swap,
        )  # fmt: skip
        return world or changed

    def _refresh(
        self,
        registry: Registry,
        current: int,
        refused: dict[int, str],
        what: str,
        load: Callable[[str], Any],
        install: Callable[[Any, int], None],
    ) -> bool:
        """Load and install `registry`'s latest version if it is new and not refused before."""
        try:
            target = registry.resolve("latest")
        except VersionNotFoundError:
            return False
        if target == current or target in refused:
            return False
        try:
            loaded = load(registry.verify(target).path)
        except Exception as exc:
            refused[target] = str(exc)
            log.error(f"refusing {what} version", version=target, reason=str(exc))
            return False
        install(loaded, target)
        log.info(f"serving {what} version", version=target)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()


def serve_models(
    world: Path | None,
    reward: Path | None,
    ports: TritonPorts,
    *,
    registry: str | None = None,
    device: str = "cpu",
    sampler_steps: int = 3,
    max_batch_size: int = 32,
    max_queue_delay_us: int = 2000,
    bind_address: str = "0.0.0.0",
) -> tuple[Any, ServedModels, WorldModelWatcher | None]:
    """Start Triton with `dream` and `reward`.

    Each model comes from its checkpoint when given, else from the registry's ``latest`` version; with a
    registry, newly published world-model versions are swapped in — and reward-model versions too when the
    reward model came from the registry.
    """
    world_registry = Registry(registry, "worldmodel") if registry else None
    reward_registry = Registry(registry, "reward") if registry and reward is None else None
    version, reward_version = 1, 0
    if world is None:
        if world_registry is None:
            raise ValueError("give a world-model checkpoint or a registry")
        info = world_registry.verify("latest")
        world, version = Path(info.path), info.version
    if reward is None:
        if reward_registry is None:
            raise ValueError("give a reward-model checkpoint or a registry")
        reward_info = reward_registry.verify("latest")
        reward, reward_version = Path(reward_info.path), reward_info.version
    model, _ = load_world_model(world, device)
    models = ServedModels(
        model,
        load_reward_model(reward, device),
        version=version,
        reward_version=reward_version,
        sampler_steps=sampler_steps,
    )
    triton = start_triton(
        lambda t: bind_models(t, models, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us),
        ports,
        bind_address=bind_address,
    )
    watcher = None
    if world_registry is not None:
        watcher = WorldModelWatcher(models, world_registry, device, reward_registry=reward_registry).start()
    return triton, models, watcher
