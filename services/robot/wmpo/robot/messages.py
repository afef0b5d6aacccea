"""Numpy in, protobuf out and back: observations, `ActRequest`s, decoded action chunks, a policy's camera."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import numpy as np
import numpy.typing as npt

from wmpo.common.tensors import Array, ImageEncodingName, encode_image, from_proto, to_proto
from wmpo.robot.errors import PolicyClientError
from wmpo.v1 import common_pb2, policy_pb2


@dataclass(frozen=True)
class Actions:
    """One action chunk, decoded: `actions` float32 [T, A] in [-1, 1] (gripper last)."""

    actions: Array
    token_ids: Array
    logprobs: Array | None
    policy_version: int
    policy_sha256: str
    request_id: str = ""
    server_queue_ms: float = 0.0
    server_inference_ms: float = 0.0
    batch_size: int = 0


def make_observation(
    images: Mapping[str, npt.ArrayLike],
    instruction: str,
    proprio: npt.ArrayLike | None = None,
    *,
    encoding: ImageEncodingName = "raw",
    timestamp: float | None = None,
) -> common_pb2.Observation:
    """Build an `Observation` from uint8 HWC camera images, an instruction and a proprio vector."""
    obs = common_pb2.Observation(instruction=instruction)
    for name, image in images.items():
        obs.images[name].CopyFrom(encode_image(image, encoding))
    state = np.zeros(0, np.float32) if proprio is None else np.asarray(proprio, dtype=np.float32).reshape(-1)
    to_proto(state, out=obs.proprio)
    obs.timestamp.FromNanoseconds(int((time.time() if timestamp is None else timestamp) * 1e9))
    return obs


def act_request(
    images: Mapping[str, npt.ArrayLike],
    instruction: str,
    proprio: npt.ArrayLike | None = None,
    *,
    version: str | int = "",
    temperature: float = 0.0,
    seed: int | None = None,
    return_logprobs: bool = False,
    encoding: ImageEncodingName = "raw",
    request_id: str = "",
) -> policy_pb2.ActRequest:
    """The `ActRequest` for one observation: `version` "" is the current one; `seed` None leaves it unset."""
    sampling = common_pb2.SamplingParams(temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    return policy_pb2.ActRequest(
        observation=make_observation(images, instruction, proprio, encoding=encoding),
        version=str(version),
        sampling=sampling,
        return_logprobs=return_logprobs,
        request_id=request_id,
    )


def parse_chunk(response: policy_pb2.ActResponse) -> Actions:
    """Decode an `ActResponse` into numpy arrays (validated: dtypes, matching shapes, finite values)."""
    chunk = response.chunk
    actions = from_proto(chunk.actions, field="chunk.actions", dtype=np.float32, shape=(None, None))
    tokens = from_proto(chunk.token_ids, field="chunk.token_ids", dtype=np.int32, shape=actions.shape)
    logprobs = None
    if chunk.HasField("logprobs") and chunk.logprobs.shape:
        logprobs = from_proto(chunk.logprobs, field="chunk.logprobs", dtype=np.float32, shape=actions.shape)
    return Actions(
        actions=actions,
        token_ids=tokens,
        logprobs=logprobs,
        policy_version=int(chunk.policy_version),
        policy_sha256=chunk.policy_sha256,
        request_id=response.request_id,
        server_queue_ms=float(response.timing.queue_ms),
        server_inference_ms=float(response.timing.inference_ms),
        batch_size=int(response.timing.batch_size),
    )


def is_pinned(version: str | int) -> bool:
    """A version number (its info never changes), not "" (the current version) or an alias."""
    return str(version).isdigit()


def single_camera(info: policy_pb2.PolicyInfo, version: str | int) -> str:
    """The one camera a policy expects; FAILED_PRECONDITION if it expects several (or none)."""
    names = list(info.spec.camera_names)
    if len(names) != 1:
        raise PolicyClientError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"policy version {version or 'current'} expects cameras {names}; exactly one is needed",
        )
    return names[0]
