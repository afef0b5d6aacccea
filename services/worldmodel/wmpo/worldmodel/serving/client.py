"""Typed clients of the Triton models: the world model (`dream`) and the reward model (`reward`).

`WorldModelClient` / `RewardClient` are synchronous (for gRPC servicer threads); `AsyncWorldModelClient` /
`AsyncRewardClient` are for asyncio rollout workers, whose many concurrent episodes Triton batches together.
A reward client made with `beside(world_model_client)` shares that client's connection to the same Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from wmpo.common.tensors import Array

# The Triton model names (part of the wire contract; the world model is served as `dream`).
WORLD_MODEL_NAME, REWARD_MODEL_NAME = "dream", "reward"


@dataclass(frozen=True)
class WorldModelSpec:
    """Shapes the served world model takes and returns, read from Triton's model config."""

    context_frames: int
    future_frames: int
    image_size: int
    channels: int
    action_dim: int
    clip_len: int
    version: str


def _inputs(module: Any, context: Array, actions: Array, seed: int) -> list[Any]:
    arrays: dict[str, Array] = {
        "context": np.ascontiguousarray(context, np.uint8)[None],
        "actions": np.ascontiguousarray(actions, np.float32)[None],
        "seed": np.array([[seed]], np.int64),
    }
    types = {"context": "UINT8", "actions": "FP32", "seed": "INT64"}
    inputs = []
    for name, array in arrays.items():
        item = module.InferInput(name, list(array.shape), types[name])
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def _clip_input(module: Any, clips: Array) -> list[Any]:
    array = np.ascontiguousarray(clips, np.uint8)
    item = module.InferInput("clip", list(array.shape), "UINT8")
    item.set_data_from_numpy(array)
    return [item]


def _spec(world_config: dict[str, Any], reward_config: dict[str, Any], version: str) -> WorldModelSpec:
    shapes = {i["name"]: [int(d) for d in i["dims"]] for i in world_config["input"]}
    clip = [int(d) for d in reward_config["input"][0]["dims"]]
    k, h, _w, c = shapes["context"]
    f, a = shapes["actions"]
    return WorldModelSpec(k, f, h, c, a, clip[0], version)


def _frames(result: Any) -> tuple[Array, int]:
    return result.as_numpy("frames")[0], int(result.as_numpy("model_version")[0, 0])


def _probability(result: Any) -> Array:
    probability: Array = result.as_numpy("probability")[:, 0]
    return probability


class _TritonClient:
    """One connection to Triton (`tritonclient.grpc`, or `.aio` when `_AIO`), owned or shared."""

    _AIO = False

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        if self._AIO:
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.grpc as module
        self._module: Any = module
        self.client: Any = module.InferenceServerClient(url=url)
        self.timeout = timeout
        self._owned = True

    @classmethod
    def beside(cls, other: _TritonClient) -> Self:
        """A client on `other`'s connection to the same Triton (closing it leaves that connection open)."""
        if other._AIO != cls._AIO:
            raise TypeError(f"{cls.__name__} cannot share the connection of a {type(other).__name__}")
        client = cls.__new__(cls)
        client._module, client.client, client.timeout = other._module, other.client, other.timeout
        client._owned = False
        return client


class WorldModelClient(_TritonClient):
    """Synchronous world-model client: `spec` of the served pair, `imagine` one chunk."""

    def spec(self) -> WorldModelSpec:
        world = self.client.get_model_config(WORLD_MODEL_NAME, as_json=True)["config"]
        reward = self.client.get_model_config(REWARD_MODEL_NAME, as_json=True)["config"]
        version = self.client.get_model_metadata(WORLD_MODEL_NAME, as_json=True)["versions"][0]
        return _spec(world, reward, str(version))

    def imagine(self, context: Array, actions: Array, seed: int) -> tuple[Array, int]:
        """context uint8 [K,H,W,C], actions [F,A] -> (frames uint8 [F,H,W,C], world-model version)."""
        inputs = _inputs(self._module, context, actions, seed)
        return _frames(self.client.infer(WORLD_MODEL_NAME, inputs, client_timeout=self.timeout))

    def close(self) -> None:
        if self._owned:
            self.client.close()


class RewardClient(_TritonClient):
    """Synchronous reward-model client: P(success) for a batch of clips."""

    def probability(self, clips: Array) -> Array:
        """uint8 clips [B,N,H,W,C] -> P(success) [B]."""
        inputs = _clip_input(self._module, clips)
        return _probability(self.client.infer(REWARD_MODEL_NAME, inputs, client_timeout=self.timeout))

    def close(self) -> None:
        if self._owned:
            self.client.close()


class AsyncWorldModelClient(_TritonClient):
    """asyncio client (`tritonclient.grpc.aio`) with the same calls as `WorldModelClient`."""

    _AIO = True

    async def spec(self) -> WorldModelSpec:
        world = (await self.client.get_model_config(WORLD_MODEL_NAME, as_json=True))["config"]
        reward = (await self.client.get_model_config(REWARD_MODEL_NAME, as_json=True))["config"]
        version = (await self.client.get_model_metadata(WORLD_MODEL_NAME, as_json=True))["versions"][0]
        return _spec(world, reward, str(version))

    async def imagine(self, context: Array, actions: Array, seed: int) -> tuple[Array, int]:
        inputs = _inputs(self._module, context, actions, seed)
        return _frames(await self.client.infer(WORLD_MODEL_NAME, inputs, client_timeout=self.timeout))

    async def close(self) -> None:
        if self._owned:
            await self.client.close()


class AsyncRewardClient(_TritonClient):
    """asyncio client with the same calls as `RewardClient`."""

    _AIO = True

    async def probability(self, clips: Array) -> Array:
        inputs = _clip_input(self._module, clips)
        return _probability(await self.client.infer(REWARD_MODEL_NAME, inputs, client_timeout=self.timeout))

    async def close(self) -> None:
        if self._owned:
            await self.client.close()
