"""Typed clients of the Triton models: the world model (`dream`) and the reward model (`reward`).

`WorldModelClient` / `RewardClient` are synchronous (for gRPC servicer threads); `AsyncWorldModelClient` /
`AsyncRewardClient` are for asyncio rollout workers, whose many concurrent episodes Triton batches together.
A reward client made with `beside(world_model_client)` shares that client's connection to the same Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from wmpo.common.tensors import Array

DREAM, REWARD = "dream", "reward"


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


def _spec(dream_config: dict[str, Any], reward_config: dict[str, Any], version: str) -> WorldModelSpec:
    shapes = {i["name"]: [int(d) for d in i["dims"]] for i in dream_config["input"]}
    clip = [int(d) for d in reward_config["input"][0]["dims"]]
    k, h, _w, c = shapes["context"]
    f, a = shapes["actions"]
    return WorldModelSpec(k, f, h, c, a, clip[0], version)


class WorldModelClient:
    """Synchronous world-model client: `spec` of the served pair, `imagine` one chunk."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        import tritonclient.grpc as grpcclient

        self._module = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.timeout = timeout

    def spec(self) -> WorldModelSpec:
        dream = self.client.get_model_config(DREAM, as_json=True)["config"]
        reward = self.client.get_model_config(REWARD, as_json=True)["config"]
        version = self.client.get_model_metadata(DREAM, as_json=True)["versions"][0]
        return _spec(dream, reward, str(version))

    def imagine(self, context: Array, actions: Array, seed: int) -> tuple[Array, int]:
        """context uint8 [K,H,W,C], actions [F,A] -> (frames uint8 [F,H,W,C], world-model version)."""
        result = self.client.infer(DREAM, _inputs(self._module, context, actions, seed), client_timeout=self.timeout)
        return result.as_numpy("frames")[0], int(result.as_numpy("model_version")[0, 0])

    def close(self) -> None:
        self.client.close()


class RewardClient:
    """Synchronous reward-model client: P(success) for a batch of clips."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        import tritonclient.grpc as grpcclient

        self._module = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.timeout = timeout
        self._owned = True

    @classmethod
    def beside(cls, world_model: WorldModelClient) -> RewardClient:
        """A reward client on the world-model client's connection (closing it leaves that connection open)."""
        reward = cls.__new__(cls)
        reward._module, reward.client, reward.timeout = world_model._module, world_model.client, world_model.timeout
        reward._owned = False
        return reward

    def probability(self, clips: Array) -> Array:
        """uint8 clips [B,N,H,W,C] -> P(success) [B]."""
        result = self.client.infer(REWARD, _clip_input(self._module, clips), client_timeout=self.timeout)
        probability: Array = result.as_numpy("probability")[:, 0]
        return probability

    def close(self) -> None:
        if self._owned:
            self.client.close()


class AsyncWorldModelClient:
    """asyncio client (`tritonclient.grpc.aio`) with the same calls as `WorldModelClient`."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        import tritonclient.grpc.aio as aioclient

        self._module = aioclient
        self.client = aioclient.InferenceServerClient(url=url)
        self.timeout = timeout

    async def spec(self) -> WorldModelSpec:
        dream = (await self.client.get_model_config(DREAM, as_json=True))["config"]
        reward = (await self.client.get_model_config(REWARD, as_json=True))["config"]
        version = (await self.client.get_model_metadata(DREAM, as_json=True))["versions"][0]
        return _spec(dream, reward, str(version))

    async def imagine(self, context: Array, actions: Array, seed: int) -> tuple[Array, int]:
        result = await self.client.infer(
            DREAM, _inputs(self._module, context, actions, seed), client_timeout=self.timeout
        )
        return result.as_numpy("frames")[0], int(result.as_numpy("model_version")[0, 0])

    async def close(self) -> None:
        await self.client.close()


class AsyncRewardClient:
    """asyncio client with the same calls as `RewardClient`."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        import tritonclient.grpc.aio as aioclient

        self._module = aioclient
        self.client = aioclient.InferenceServerClient(url=url)
        self.timeout = timeout
        self._owned = True

    @classmethod
    def beside(cls, world_model: AsyncWorldModelClient) -> AsyncRewardClient:
        """A reward client on the world-model client's connection (closing it leaves that connection open)."""
        reward = cls.__new__(cls)
        reward._module, reward.client, reward.timeout = world_model._module, world_model.client, world_model.timeout
        reward._owned = False
        return reward

    async def probability(self, clips: Array) -> Array:
        result = await self.client.infer(REWARD, _clip_input(self._module, clips), client_timeout=self.timeout)
        probability: Array = result.as_numpy("probability")[:, 0]
        return probability

    async def close(self) -> None:
        if self._owned:
            await self.client.close()
