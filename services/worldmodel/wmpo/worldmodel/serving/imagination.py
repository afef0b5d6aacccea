"""The `wmpo.v1.Imagination` gRPC service: gym-like sessions over the Triton `dream` and `reward` models.

Session state (the last K frames, the last N frames for the reward clip, counters, the instruction) lives
in Redis under ``wmpo:imagination:session:<id>`` with a TTL refreshed on every call, so any replica can
serve any Step and an abandoned session expires on its own.

Simulator starts and the audit. A session can start from a simulator reset (task + training seed): the reset
frame is rendered at the world model's image size by the server's camera (`SessionLimits.sim_camera`), on one
dedicated thread whose environments only ever reset, so the frame equals a fresh environment's. Such a session
also keeps what an audit needs — its executed actions (one per imagined frame), the reward model's probability
of each imagined frame, and the imagined frames at the audit horizons (1, 8, 16, 32) — and `Audit` replays the
actions open-loop in a fresh simulator from the seed (`wmpo.sim.replay`), then compares. `wmpo.sim` and MetaWorld
are imported only then: a server without them serves everything else, and answers FAILED_PRECONDITION there.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from wmpo.common.logs import get_logger
from wmpo.common.tensors import Array, TensorError, from_proto, to_proto
from wmpo.v1 import common_pb2, imagination_pb2, imagination_pb2_grpc
from wmpo.worldmodel.rollout_rules import cut_chunk, roll_buffers, start_buffers, trailing_clips
from wmpo.worldmodel.serving.client import RewardClient, WorldModelClient, WorldModelSpec

if TYPE_CHECKING:
    from wmpo.sim.env import MetaWorldEnv
    from wmpo.sim.replay import Replay

log = get_logger(__name__)
SERVICE_NAME = "wmpo.v1.Imagination"
PREFIX = "wmpo:imagination"
NO_SIMULATOR = (
    "this server has no simulator: install MetaWorld and MuJoCo (`pip install wmpo[sim]`) to start sessions "
    "from simulator resets and audit them"
)
T = TypeVar("T")


@dataclass
class SessionLimits:
    ttl_s: int = 600
    max_sessions: int = 4096
    default_horizon: int = 128
    success_threshold: float = 0.96
    sim_camera: str = "corner"  # the MetaWorld camera of simulator starts and audits


class SimulatorUnavailableError(RuntimeError):
    """The simulator (MetaWorld, MuJoCo, an offscreen renderer) cannot run on this server."""


def _build_env(task: str, image_size: int, camera: str) -> MetaWorldEnv:
    from wmpo.sim.env import MetaWorldEnv

    return MetaWorldEnv(task, image_size=image_size, camera=camera)


def _simulator_call(fn: Callable[[], T]) -> T:
    """`fn()`, with a missing simulator or renderer turned into `SimulatorUnavailableError`."""
    from wmpo.common.errors import UserError

    try:
        return fn()
    except ImportError as exc:
        raise SimulatorUnavailableError(f"{NO_SIMULATOR} ({exc})") from exc
    except UserError as exc:  # rendering failed (no EGL/OSMesa): the message says what to install
        raise SimulatorUnavailableError(str(exc)) from exc


class SimulatorStarts:
    """Simulator reset frames and audit replays for the servicer, at one image size and camera.

    Reset frames are rendered on one dedicated thread (an EGL context belongs to the thread that made it) by one
    `MetaWorldEnv` per task that only ever resets, so each frame equals a fresh environment's reset frame. Replays
    build a fresh environment each (a stepped one does not reset bit-exactly), on the calling thread, and close it.
    """

    def __init__(self, image_size: int, camera: str) -> None:
        self.image_size, self.camera = image_size, camera
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagination-sim")
        self._envs: dict[str, MetaWorldEnv] = {}

    @staticmethod
    def check(task: str, seed: int) -> str:
        """The task's instruction; `TensorError` for an unknown task or a held-out (evaluation) seed."""
        from wmpo.common.errors import UserError
        from wmpo.sim.tasks import EVAL_SEED_OFFSET, get_task  # plain Python: no MetaWorld needed

        try:
            instruction = get_task(task).instruction
        except UserError as exc:
            raise TensorError("sim.task", str(exc)) from None
        if seed >= EVAL_SEED_OFFSET:
            raise TensorError("sim.seed", f"seeds from {EVAL_SEED_OFFSET} on are held out for evaluation; got {seed}")
        return instruction

    def reset_frame(self, task: str, seed: int) -> Array:
        """uint8 [H, W, C]: the reset frame of `task` at `seed`."""
        return self._thread.submit(_simulator_call, partial(self._reset, task, seed)).result()

    def _reset(self, task: str, seed: int) -> Array:
        env = self._envs.get(task)
        if env is None:
            env = self._envs[task] = _build_env(task, self.image_size, self.camera)
        return env.reset(seed).image

    def replay(self, task: str, seed: int, actions: Array) -> Replay:
        """The real frames and per-step success of `actions` replayed from `task`'s reset at `seed`."""

        def run() -> Replay:
            from wmpo.sim.replay import replay_actions

            env = _build_env(task, self.image_size, self.camera)  # fresh: a stepped one does not reset bit-exactly
            try:
                return replay_actions(task, seed, actions, image_size=self.image_size, camera=self.camera, env=env)
            finally:
                env.close()

        return _simulator_call(run)

    def close(self) -> None:
        """Free the renderers on their thread, then end it."""
        self._thread.submit(self._close_all).result()
        self._thread.shutdown(wait=True)

    def _close_all(self) -> None:
        envs, self._envs = list(self._envs.values()), {}
        for env in envs:
            env.close()


class ImaginationServicer(imagination_pb2_grpc.ImaginationServicer):
    """Implements Reset/Step/Audit/Close/GetWorldModelInfo with Redis-held sessions."""

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
        self.sim = SimulatorStarts(self.spec.image_size, limits.sim_camera)

    def close(self) -> None:
        """Free the simulator renderers (call after the server stopped)."""
        self.sim.close()

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
        if which == "sim":
            frame = self.sim.reset_frame(request.sim.task, int(request.sim.seed))
            if frame.shape != (h, w, c):
                raise TensorError("sim", f"the simulator renders {frame.shape}, the world model takes {(h, w, c)}")
            return frame[None]
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
        raise TensorError("start", "give initial frames, a dataset start state or a simulator start")

    # -- RPCs ------------------------------------------------------------------------------------------
    def Reset(
        self, request: imagination_pb2.ResetRequest, context: grpc.ServicerContext
    ) -> imagination_pb2.ResetResponse:
        sim: dict[str, Any] | None = None
        try:
            instruction = request.instruction.strip()
            if request.WhichOneof("start") == "sim":
                sim = {"task": request.sim.task, "seed": int(request.sim.seed)}
                task_instruction = _simulator_call(partial(self.sim.check, sim["task"], sim["seed"]))
                instruction = instruction or task_instruction
            frames = self._start_frames(request)
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
        except SimulatorUnavailableError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        padded, history = start_buffers(frames, self.spec.context_frames, self.spec.clip_len)
        session_id = uuid.uuid4().hex
        horizon = int(request.horizon or self.limits.default_horizon)
        seed = int(request.seed) if request.HasField("seed") else int(np.random.default_rng().integers(2**62))
        state = {"instruction": instruction, "horizon": horizon, "elapsed": 0, "seed": seed, "threshold": threshold,
                 "done": 0, "success": 0}  # fmt: skip
        audit: dict[str, bytes] = {}
        if sim is not None:  # what an audit needs: executed actions, probabilities, frames at the audit horizons
            state["sim"] = sim
            audit = {"actions": b"", "probs": b"", "frame:0": padded[-1].tobytes()}
        self._store(session_id, state, padded, history, audit)
        response = imagination_pb2.ResetResponse(
            session_id=session_id, instruction=instruction, horizon=horizon,
            world_model_version=self.spec.version, reward_model_version="1",
        )  # fmt: skip
        to_proto(padded[-1], out=response.frame)
        return response

    def _store(
        self, session_id: str, state: dict[str, Any], context: Array, history: Array, extra: dict[str, bytes]
    ) -> None:
        key, ttl = self._key(session_id), self.limits.ttl_s
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"state": json.dumps(state), "context": context.tobytes(), "history": history.tobytes()})
        for name, value in extra.items():
            pipe.hset(key, name, value)
        pipe.expire(key, ttl)
        pipe.zadd(f"{PREFIX}:sessions", {session_id: time.time() + ttl})
        pipe.execute()

    def _touch(self, session_id: str) -> None:
        ttl = self.limits.ttl_s
        pipe = self.redis.pipeline()
        pipe.expire(self._key(session_id), ttl)
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
        audit: dict[str, bytes] = {}
        if "sim" in state:  # keep what an audit of this session needs
            from wmpo.worldmodel.metrics import HORIZONS

            kept = len(outcome.frames)
            audit["actions"] = raw.get(b"actions", b"") + actions[:kept].astype(np.float32).tobytes()
            audit["probs"] = raw.get(b"probs", b"") + outcome.probs.astype(np.float32).tobytes()
            for j, frame in enumerate(outcome.frames, start=state["elapsed"] + 1):
                if j in HORIZONS:
                    audit[f"frame:{j}"] = frame.tobytes()
        state["elapsed"] += len(outcome.frames)
        state["done"] = int(outcome.done)
        state["success"] = int(outcome.success)
        self._store(request.session_id, state, *roll_buffers(ctx, history, outcome.frames), audit)
        response = imagination_pb2.StepResponse(
            reward=1.0 if outcome.success else 0.0, done=outcome.done, success=outcome.success,
            truncated=outcome.truncated, elapsed_frames=state["elapsed"],
        )  # fmt: skip
        to_proto(outcome.frames, out=response.frames)
        to_proto(outcome.probs.astype(np.float32), out=response.success_probs)
        response.info.CopyFrom(common_pb2.Info())
        response.info.values.update({"max_success_prob": float(outcome.probs.max(initial=0.0))})
        return response

    def Audit(
        self, request: imagination_pb2.AuditRequest, context: grpc.ServicerContext
    ) -> imagination_pb2.AuditResponse:
        raw: dict[bytes, bytes] = self.redis.hgetall(self._key(request.session_id))  # type: ignore[assignment]
        if not raw:
            context.abort(grpc.StatusCode.NOT_FOUND, f"session {request.session_id!r} does not exist or expired")
        self._touch(request.session_id)  # an audit is a call: the session's TTL starts again
        state = json.loads(raw[b"state"])
        sim = state.get("sim")
        if sim is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {request.session_id!r} did not start from a simulator reset (Reset with `sim`): it has no "
                "real start state to replay its actions from",
            )
        from wmpo.worldmodel.metrics import HORIZONS, psnr, ssim

        actions = np.frombuffer(raw[b"actions"], np.float32).reshape(-1, self.spec.action_dim)
        try:
            replay = self.sim.replay(sim["task"], int(sim["seed"]), actions)
        except SimulatorUnavailableError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        shape = self._frame_shape()
        imagined_success = bool(state["success"])
        response = imagination_pb2.AuditResponse(
            session_id=request.session_id, start=imagination_pb2.SimStart(task=sim["task"], seed=int(sim["seed"])),
            actions=len(actions), done=bool(state["done"]), imagined_success=imagined_success,
            real_success=replay.solved, agree=imagined_success == replay.solved,
        )  # fmt: skip
        if replay.first_success is not None:
            response.first_real_success = replay.first_success
        to_proto(replay.success.astype(bool), out=response.real_step_success)
        to_proto(np.frombuffer(raw[b"probs"], np.float32), out=response.success_probs)
        real, start = replay.frames, replay.frames[0]
        for h in HORIZONS:
            stored = raw.get(f"frame:{h}".encode())
            if stored is None or h >= len(real):
                continue
            imagined = np.frombuffer(stored, np.uint8).reshape(shape)
            response.fidelity.add(
                horizon=h, psnr=psnr(imagined, real[h]), ssim=ssim(imagined, real[h]),
                copy_psnr=psnr(start, real[h]), copy_ssim=ssim(start, real[h]),
            )  # fmt: skip
        if request.return_frames:
            to_proto(real, out=response.real_frames)
        log.info("audited a session", session=request.session_id, actions=len(actions), real_success=replay.solved,
                 imagined_success=imagined_success)  # fmt: skip
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
