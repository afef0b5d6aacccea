"""`PolicyClient`: a typed, numpy-in/numpy-out wrapper around the `wmpo.v1.Policy` gRPC stub."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from wmpo.common.tensors import Array, ImageEncodingName, encode_image, from_proto, to_proto
from wmpo.v1 import common_pb2, policy_pb2, policy_pb2_grpc

_DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class PolicyClientError(RuntimeError):
    """A failed policy call: `code` is the gRPC status code, the message the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


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


def parse_address(address: str) -> tuple[str, bool]:
    """``grpc://host:port`` -> (host:port, TLS off); ``grpcs://`` -> TLS on; bare ``host:port`` -> off."""
    tls = address.startswith("grpcs://")
    if tls or address.startswith("grpc://"):
        address = address.split("://", 1)[1]
    elif "://" in address:
        raise ValueError(f"unsupported address {address!r}: use grpc://host:port or grpcs://host:port")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} must look like host:port")
    return address, tls


class PolicyClient:
    """A connection to a policy server. Thread-safe; reuse one per process.

    `address`: ``grpc://host:port`` (plaintext) or ``grpcs://host:port`` (TLS, with the system roots or
    `root_cert`). `token` is sent as ``authorization: Bearer <token>``. `timeout` is the per-call deadline.
    Calls answered UNAVAILABLE (server restarting, network blip) are retried `retries` times with
    exponential backoff starting at `backoff_s` (with jitter).
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        root_cert: bytes | Path | None = None,
        timeout: float = 10.0,
        max_message_bytes: int = _DEFAULT_MAX_MESSAGE_BYTES,
        retries: int = 3,
        backoff_s: float = 0.1,
    ) -> None:
        target, tls = parse_address(address)
        self.retries, self.backoff_s = retries, backoff_s
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls or root_cert is not None:
            roots = Path(root_cert).read_bytes() if isinstance(root_cert, Path) else root_cert
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = policy_pb2_grpc.PolicyStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def act(
        self,
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
    ) -> Actions:
        """Send one observation; returns the action chunk of the requested (or current) version."""
        request = self.build_request(
            images,
            instruction,
            proprio,
            version=version,
            temperature=temperature,
            seed=seed,
            return_logprobs=return_logprobs,
            encoding=encoding,
            request_id=request_id,
        )
        return parse_chunk(self._call(self._stub.Act, request))

    def _call(self, method: Any, request: Any) -> Any:
        """A unary call with the deadline, the token, and retries with backoff on UNAVAILABLE."""
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = _client_error(exc)
                if error.code != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise error from None
                time.sleep(self.backoff_s * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    @staticmethod
    def build_request(
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
        """The `ActRequest` that `act` sends (also what to put on a `stream`)."""
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

    def stream(self, requests: Iterable[policy_pb2.ActRequest]) -> Iterator[Actions | PolicyClientError]:
        """Keep one bidirectional stream open: yields one result per request, in order.

        A request the server rejects yields a `PolicyClientError` and the stream goes on.
        """
        try:
            for item in self._stub.StreamAct(iter(requests), metadata=self._metadata):
                if item.HasField("error"):
                    yield PolicyClientError(status_code(item.error.code), item.error.message)
                else:
                    yield parse_chunk(item.response)
        except grpc.RpcError as exc:
            raise _client_error(exc) from None

    def list_versions(self) -> policy_pb2.ListVersionsResponse:
        """The versions the server can serve, with aliases and residency."""
        response: policy_pb2.ListVersionsResponse = self._call(
            self._stub.ListVersions, policy_pb2.ListVersionsRequest()
        )
        return response

    def info(self, version: str | int = "") -> policy_pb2.PolicyInfo:
        """What `version` expects (cameras, image size, proprio) and produces (action dims, chunk length)."""
        response: policy_pb2.PolicyInfo = self._call(
            self._stub.GetPolicyInfo, policy_pb2.GetPolicyInfoRequest(version=str(version))
        )
        return response

    def action_stream(
        self,
        instruction: str,
        *,
        version: str | int = "",
        temperature: float = 0.0,
        refill_at: int = 2,
        encoding: ImageEncodingName = "raw",
    ) -> ActionStream:
        """An `ActionStream` over one StreamAct call (see there)."""
        return ActionStream(
            self, instruction, version=version, temperature=temperature, refill_at=refill_at, encoding=encoding
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ActionStream:
    """Action chunks over one bidirectional stream, with a queue that is refilled before it runs out.

    Call `next_action(images, proprio)` once per control step with the current observation. When at most
    `refill_at` actions are left, the next chunk is requested (with that observation) while the robot
    keeps executing the queued ones, as LeRobot's asynchronous inference does; when the chunk arrives it
    replaces the queue, minus the actions executed since it was requested. Only an empty queue blocks.
    """

    def __init__(
        self, client: PolicyClient, instruction: str, *, version: str | int = "", temperature: float = 0.0,
        refill_at: int = 2, encoding: ImageEncodingName = "raw",
    ) -> None:  # fmt: skip
        self.client, self.instruction = client, instruction
        self.version, self.temperature, self.refill_at, self.encoding = str(version), temperature, refill_at, encoding
        self._requests: queue.Queue[policy_pb2.ActRequest | None] = queue.Queue()
        self._responses: queue.Queue[Actions | PolicyClientError] = queue.Queue()
        self._actions: deque[Array] = deque()
        self._in_flight: int | None = None  # step counter when the pending request was sent
        self._step = 0
        self.chunks_received = 0
        self.waits = 0  # times the robot had to wait for actions (queue ran dry)
        self._reader = threading.Thread(target=self._read, daemon=True, name="wmpo-action-stream")
        self._reader.start()

    def _iter_requests(self) -> Iterator[policy_pb2.ActRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for result in self.client.stream(self._iter_requests()):
                self._responses.put(result)
        except PolicyClientError as exc:
            self._responses.put(exc)

    def _request(self, images: Mapping[str, npt.ArrayLike], proprio: npt.ArrayLike | None) -> None:
        self._requests.put(
            PolicyClient.build_request(
                images,
                self.instruction,
                proprio,
                version=self.version,
                temperature=self.temperature,
                encoding=self.encoding,
                request_id=str(self._step),
            )
        )
        self._in_flight = self._step

    def _receive(self, block: bool) -> None:
        try:
            result = self._responses.get(block=block, timeout=self.client.timeout if block else None)
        except queue.Empty:
            if block:
                raise PolicyClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "no action chunk in time") from None
            return
        if isinstance(result, PolicyClientError):
            self._in_flight = None
            raise result
        executed_since = self._step - (self._in_flight or 0)
        self._actions = deque(result.actions[executed_since:])
        self._in_flight = None
        self.chunks_received += 1

    def next_action(self, images: Mapping[str, npt.ArrayLike], proprio: npt.ArrayLike | None = None) -> Array:
        """The action to execute now (float32 [A])."""
        if self._in_flight is not None:
            self._receive(block=False)
        if not self._actions:
            if self._in_flight is None:
                self._request(images, proprio)
            self.waits += 1
            while not self._actions:
                self._receive(block=True)
                if not self._actions:  # the chunk was used up while in flight: ask again
                    self._request(images, proprio)
        elif len(self._actions) <= self.refill_at and self._in_flight is None:
            self._request(images, proprio)
        self._step += 1
        return np.asarray(self._actions.popleft())

    def close(self) -> None:
        self._requests.put(None)
        self._reader.join(timeout=5)

    def __enter__(self) -> ActionStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def status_code(code: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` of a numeric code (as carried by `StreamError.code`); UNKNOWN if invalid."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def _client_error(exc: grpc.RpcError) -> PolicyClientError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return PolicyClientError(code, details or "")
