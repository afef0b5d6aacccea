"""Episode jobs and their results, as bytes on the job queue.

A job's `environment` says where it rolls out: ``dream`` (from real start frames, imagined by the world model)
or ``sim`` (from the simulator reset of `reset_seed`, a real episode). Results carry, per chunk, what the
policy saw (the frame and the proprio it was sent; proprio [n_chunks, 0] when it was sent none) and the
tokens and log-probs it answered; `real` marks an episode that used the real simulator.

An `audit` dream job starts from the rendered simulator reset of `reset_seed`; after imagining it the worker
replays its executed actions open-loop in the simulator from that seed (`wmpo.sim.replay`), and the result
carries both sides: the imagined frames (`frames`) and the real ones (`real_frames`), the reward model's
per-frame probabilities and the simulator's per-step success (`real_step_success`), and `real_success`. That is
two frame sequences of at most horizon + 1 frames: an audited result is the largest message, bounded by the
horizon.

A message is a small self-describing binary: a 4-byte little-endian header length, a JSON header (plain
fields plus, for each array, its dtype, shape and byte offset) and the raw little-endian array bytes. No
pickle: a worker or learner never executes what it reads from Redis.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from wmpo.common.tensors import Array

_LEN = struct.Struct("<I")


class MessageError(ValueError):
    """Bytes that are not a well-formed job or result."""


def pack(fields: dict[str, Any], arrays: dict[str, Array]) -> bytes:
    """Fields (JSON-able) and named arrays -> bytes."""
    specs, chunks, offset = {}, [], 0
    for name, array in arrays.items():
        data = np.ascontiguousarray(array)
        raw = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        specs[name] = {"dtype": data.dtype.str.lstrip("<>|="), "shape": list(data.shape), "offset": offset}
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps({"fields": fields, "arrays": specs}, separators=(",", ":")).encode()
    return _LEN.pack(len(header)) + header + b"".join(chunks)


def unpack(message: bytes) -> tuple[dict[str, Any], dict[str, Array]]:
    """Bytes -> (fields, arrays); `MessageError` if they are malformed."""
    try:
        (size,) = _LEN.unpack_from(message)
        header = json.loads(message[_LEN.size : _LEN.size + size])
        body = memoryview(message)[_LEN.size + size :]
        arrays = {}
        for name, spec in header["arrays"].items():
            dtype = np.dtype("<" + spec["dtype"]) if spec["dtype"][0] in "fiuc" else np.dtype(spec["dtype"])
            count = int(np.prod(spec["shape"], dtype=np.int64))
            end = spec["offset"] + count * dtype.itemsize
            if end > len(body):
                raise MessageError(f"array {name!r} runs past the end of the message")
            arrays[name] = np.frombuffer(body[spec["offset"] : end], dtype=dtype).reshape(spec["shape"])
        return dict(header["fields"]), arrays
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, MessageError):
            raise
        raise MessageError(f"malformed message: {exc}") from exc


ENVIRONMENTS = ("dream", "sim")
NO_FRAMES = np.zeros((0, 0, 0, 3), np.uint8)
"""`start_frames` of a sim job: its start state is the simulator reset of `reset_seed`."""


@dataclass
class EpisodeJob:
    """One episode to roll out: a start state, the pinned policy version, sampling and horizon."""

    job_id: str
    run_id: str
    iteration: int
    group: int  # the start state's group within the iteration
    index: int  # the episode's index within its group
    policy_version: int  # pinned: every Act of the episode is answered by this version
    instruction: str
    start_frames: Array  # dream: uint8 [K, H, W, C] real frames, the last one is the first observation
    seed: int  # the episode's sampling seed (chunk i samples with `step_seed(seed, i)`)
    horizon: int  # frames (dream) or simulator steps (sim)
    temperature: float = 1.6
    success_threshold: float = 0.96  # dream: the reward model's success probability
    record_frames: bool = False  # return every frame (for videos)
    source: str = ""  # where the start state came from, e.g. "episode-000012@16" or "sim:reach@seed42"
    environment: str = "dream"  # "dream" or "sim"
    task: str = ""  # sim, or dream from a sim start state: the task of the simulator
    reset_seed: int | None = None  # sim, or dream from a sim start: the start state is `MetaWorldEnv(task).reset(seed)`
    camera: str = "corner"  # the MetaWorld camera rendered (sim: at the policy's image size; audit: the world model's)
    audit: bool = False  # dream from a sim start: replay the executed actions in the simulator afterwards

    def to_bytes(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "start_frames"}
        return pack(fields, {"start_frames": np.asarray(self.start_frames, np.uint8)})

    @classmethod
    def from_bytes(cls, message: bytes) -> EpisodeJob:
        fields, arrays = unpack(message)
        try:
            return cls(**fields, start_frames=arrays["start_frames"])
        except (TypeError, KeyError) as exc:
            raise MessageError(f"not an episode job: {exc}") from exc


@dataclass
class EpisodeResult:
    """A finished episode: per chunk the observation the policy saw (frame and proprio), its tokens and log-probs."""

    job_id: str
    group: int
    index: int
    policy_version: int
    world_model_version: int  # 0 for sim episodes
    success: bool
    length: int  # imagined frames (dream) or simulator steps (sim)
    observations: Array  # uint8 [n_chunks, H, W, C]: the frame each chunk was sampled from
    tokens: Array  # int32 [n_chunks, T, A]
    logprobs: Array  # float32 [n_chunks, T, A], under the sampling temperature
    success_probs: Array  # float32 [length]: the reward model's (dream) or the simulator's 0/1 (sim) per frame
    frames: Array | None = None  # uint8 [length + 1, H, W, C] when the job asked for them
    worker: str = ""
    attempt: int = 1  # the queue delivery that produced it (> 1: the job was retried or reclaimed)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    proprio: Array = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # float32 [n_chunks, P], P may be 0
    real: bool = False  # the real simulator ran (a sim episode, or an audit replay): counts against the budget
    # audited dream episodes only (`frames` then holds the imagined frames):
    real_success: bool | None = None  # the replayed actions solved the task at some step (None: not audited)
    real_step_success: Array = field(default_factory=lambda: np.zeros(0, bool))  # bool [length]: after each action
    real_frames: Array | None = None  # uint8 [length + 1, H, W, C]: the reset frame, then one per replayed action

    def __post_init__(self) -> None:
        if self.proprio.size == 0 and len(self.proprio) != len(self.observations):
            self.proprio = np.zeros((len(self.observations), 0), np.float32)  # the policy was sent no proprio

    @property
    def reward(self) -> float:
        return 1.0 if self.success else 0.0

    @property
    def audited(self) -> bool:
        """Whether the episode's actions were replayed in the real simulator."""
        return self.real_success is not None

    def to_bytes(self) -> bytes:
        arrays: dict[str, Array] = {
            "observations": np.asarray(self.observations, np.uint8),
            "tokens": np.asarray(self.tokens, np.int32),
            "logprobs": np.asarray(self.logprobs, np.float32),
            "success_probs": np.asarray(self.success_probs, np.float32),
            "proprio": np.asarray(self.proprio, np.float32),
            "real_step_success": np.asarray(self.real_step_success, bool),
        }
        for name in ("frames", "real_frames"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(value, np.uint8)
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("frames", "real_frames")}
        return pack({k: v for k, v in plain.items() if k not in arrays}, arrays)

    @classmethod
    def from_bytes(cls, message: bytes) -> EpisodeResult:
        fields, arrays = unpack(message)
        try:
            merged: dict[str, Any] = {**fields, **arrays}
            return cls(**merged)
        except TypeError as exc:
            raise MessageError(f"not an episode result: {exc}") from exc
