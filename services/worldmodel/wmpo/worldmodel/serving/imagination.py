"""The `wmpo.v1.Imagination` gRPC service: gym-like sessions over the Triton `dream` and `reward` models.

Session state (the last K frames, the last N frames for the reward clip, counters, the instruction) lives
in Redis under ``wmpo:imagination:session:<id>`` with a TTL refreshed on every call, so any replica can
serve any Step and an abandoned session expires on its own.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from wmpo.common.logs import get_logger
from wmpo.common.tensors import Array, TensorError, from_proto, to_proto
from wmpo.v1 import common_pb2, imagination_pb2, imagination_pb2_grpc
from wmpo.worldmodel.rollout_rules import cut_chunk, roll_buffers, start_buffers, trailing_clips
from wmpo.worldmodel.serving.client import RewardClient, WorldModelClient, WorldModelSpec

log = get_logger(__name__)
SERVICE_NAME = "wmpo.v1.Imagination"
PREFIX = "wmpo:imagination"


@dataclass
class SessionLimits:
    ttl_s: int = 600
    max_sessions: int = 4096
    default_horizon: int = 128
    success_threshold: float = 0.96


class ImaginationServicer(imagination_pb2_grpc.ImaginationServicer):
    """Implements Reset/Step/Close/GetWorldModelInfo with Redis-held sessions."""

    def __init__(
        self, world_model: WorldModelClient, redis_url: str, limits: SessionLimits, dataset: Path | None = None
    ) -> None:
        import redis

        self.world_model = world_model
        self.reward = RewardClient.beside(world_model)
        self.redis = redis.Redis.from_url(redis_url)
        self.limits = limits
        self.spec: WorldModelSpec = world_model.spec()
        self._dataset: Any = None
        if dataset is not None:
            from wmpo.data.dataset import TrajectoryDataset

            self._dataset = TrajectoryDataset(dataset)

    # -- helpers ---------------------------------------------------------------------------------------
    def _key(self, session_id: str) -> str:
        return f"{PREFIX}:session:{session_id}"

    def _frame_shape(self) -> tuple[int, int, int]:
        s = self.spec
        return s.image_size, s.image_size, s.channels

    def _open_sessions(self) -> int:
        now = time.time()
        self.redis.zremrangebyscore(f"{PREFIX}:sessions", "-inf", now)
        return int(self.redis.zcard(f"{PREFIX}:sessions"))

    def _start_frames(self, request: imagination_pb2.ResetRequest) -> Array:
        h, w, c = self._frame_shape()
        which = request.WhichOneof("start")
        if which == "frames":
            frames = from_proto(request.frames, field="frames", dtype=np.uint8, shape=(None, h, w, c))
            if not 1 <= frames.shape[0] <= self.spec.context_frames:
                raise TensorError("frames", f"give 1 to {self.spec.context_frames} frames, got {frames.shape[0]}")
            return frames
        if which == "dataset":
            if self._dataset is None:
                raise TensorError("dataset", "this server was started without --data; send frames instead")
            ref = request.dataset
            try:
                episode = self._dataset.episode(ref.episode_id)
            except KeyError:
                raise LookupError(f"episode {ref.episode_id!r} is not in the dataset") from None
            if ref.step > episode.length:
                raise LookupError(
                    f"episode {ref.episode_id!r} has {episode.length + 1} frames; step {ref.step} is past it"
                )
            start: Array = self._dataset.context_frames(ref.episode_id, int(ref.step), self.spec.context_frames)
            if start.shape[1:] != (h, w, c):
                raise TensorError("dataset", f"dataset frames are {start.shape[1:]}, the world model takes {(h, w, c)}")
            return start
        raise TensorError("start", "give initial frames or a dataset start state")

    # -- RPCs ------------------------------------------------------------------------------------------
    def Reset(
        self, request: imagination_pb2.ResetRequest, context: grpc.ServicerContext
    ) -> imagination_pb2.ResetResponse:
        try:
            frames = self._start_frames(request)
            instruction = request.instruction.strip()
            if not instruction:
                raise TensorError("instruction", "must not be empty")
            threshold = (
                request.success_threshold if request.HasField("success_threshold") else self.limits.success_threshold
            )
            if not (0 < threshold <= 1) or not math.isfinite(threshold):
                raise TensorError("success_threshold", f"must be in (0, 1], got {threshold}")
            if self._open_sessions() >= self.limits.max_sessions:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.limits.max_sessions} sessions are open; close some"
                )
        except (TensorError, LookupError) as exc:
            code = grpc.StatusCode.NOT_FOUND if isinstance(exc, LookupError) else grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, str(exc.args[0]) if isinstance(exc, LookupError) else str(exc))
        padded, history = start_buffers(frames, self.spec.context_frames, self.spec.clip_len)
        session_id = uuid.uuid4().hex
        horizon = int(request.horizon or self.limits.default_horizon)
        seed = int(request.seed) if request.HasField("seed") else int(np.random.default_rng().integers(2**62))
        state = {"instruction": instruction, "horizon": horizon, "elapsed": 0, "seed": seed, "threshold": threshold,
                 "done": 0}  # fmt: skip
        self._store(session_id, state, padded, history)
        response = imagination_pb2.ResetResponse(
            session_id=session_id, instruction=instruction, horizon=horizon,
            world_model_version=self.spec.version, reward_model_version="1",
        )  # fmt: skip
        to_proto(padded[-1], out=response.frame)
        return response

    def _store(self, session_id: str, state: dict[str, Any], context: Array, history: Array) -> None:
        key, ttl = self._key(session_id), self.limits.ttl_s
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"state": json.dumps(state), "context": context.tobytes(), "history": history.tobytes()})
        pipe.expire(key, ttl)
        pipe.zadd(f"{PREFIX}:sessions", {session_id: time.time() + ttl})
        pipe.execute()

    def Step(self, request: imagination_pb2.StepRequest, context: grpc.ServicerContext) -> imagination_pb2.StepResponse:
        s = self.spec
        try:
            actions = from_proto(
                request.actions, field="actions", dtype=np.float32, shape=(s.future_frames, s.action_dim)
            )
            if np.abs(actions).max(initial=0.0) > 1.0:
                raise TensorError("actions", "values must lie in [-1, 1]")
        except TensorError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        raw: dict[bytes, bytes] = self.redis.hgetall(self._key(request.session_id))  # type: ignore[assignment]
        if not raw:
            context.abort(grpc.StatusCode.NOT_FOUND, f"session {request.session_id!r} does not exist or expired")
        state = json.loads(raw[b"state"])
        if state["done"]:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"session {request.session_id!r} is done; Reset a new one"
            )
        h, w, c = self._frame_shape()
        ctx = np.frombuffer(raw[b"context"], np.uint8).reshape(s.context_frames, h, w, c)
        history = np.frombuffer(raw[b"history"], np.uint8).reshape(s.clip_len, h, w, c)
        try:
            frames, _version = self.world_model.imagine(ctx, actions, seed=state["seed"] + state["elapsed"])
            probs = self.reward.probability(trailing_clips(history, frames, s.clip_len))
        except Exception as exc:
            log.error("world model call failed", error=str(exc))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the world model is not reachable: {exc}")
        outcome = cut_chunk(frames, probs, state["threshold"], state["horizon"] - state["elapsed"])
        state["elapsed"] += len(outcome.frames)
        state["done"] = int(outcome.done)
        self._store(request.session_id, state, *roll_buffers(ctx, history, outcome.frames))
        response = imagination_pb2.StepResponse(
            reward=1.0 if outcome.success else 0.0, done=outcome.done, success=outcome.success,
            truncated=outcome.truncated, elapsed_frames=state["elapsed"],
        )  # fmt: skip
        to_proto(outcome.frames, out=response.frames)
        to_proto(outcome.probs.astype(np.float32), out=response.success_probs)
        response.info.CopyFrom(common_pb2.Info())
        response.info.values.update({"max_success_prob": float(outcome.probs.max(initial=0.0))})
        return response

    def Close(
        self, request: imagination_pb2.CloseRequest, context: grpc.ServicerContext
    ) -> imagination_pb2.CloseResponse:
        existed = bool(self.redis.delete(self._key(request.session_id)))
        self.redis.zrem(f"{PREFIX}:sessions", request.session_id)
        return imagination_pb2.CloseResponse(existed=existed)

    def GetWorldModelInfo(
        self, request: imagination_pb2.GetWorldModelInfoRequest, context: grpc.ServicerContext
    ) -> imagination_pb2.WorldModelInfo:
        s = self.spec
        return imagination_pb2.WorldModelInfo(
            world_model_version=s.version, reward_model_version="1", context_frames=s.context_frames,
            frames_per_step=s.future_frames, image_height=s.image_size, image_width=s.image_size,
            image_channels=s.channels, action_dim=s.action_dim, default_horizon=self.limits.default_horizon,
            success_threshold=self.limits.success_threshold,
        )  # fmt: skip
