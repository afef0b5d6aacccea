"""`ActionStream`: a robot's action queue over one StreamAct stream, refilled before it runs out."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Protocol

import grpc
import numpy as np
import numpy.typing as npt

from wmpo.common.tensors import Array, ImageEncodingName
from wmpo.robot.errors import PolicyClientError
from wmpo.robot.messages import Actions, act_request
from wmpo.v1 import policy_pb2


class StreamingClient(Protocol):
    """What `ActionStream` needs of a client (`PolicyClient` is one)."""

    @property
    def timeout(self) -> float: ...

    def stream(self, requests: Iterable[policy_pb2.ActRequest]) -> Iterator[Actions | PolicyClientError]: ...


class ActionStream:
    """Action chunks over one bidirectional stream, with a queue that is refilled before it runs out.

    Call `next_action(images, proprio)` once per control step with the current observation. When at most
    `refill_at` actions are left, the next chunk is requested (with that observation) while the robot
    keeps executing the queued ones, as LeRobot's asynchronous inference does; when the chunk arrives it
    replaces the queue, minus the actions executed since it was requested. Only an empty queue blocks.
    """

    def __init__(
        self, client: StreamingClient, instruction: str, *, version: str | int = "", temperature: float = 0.0,
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
            act_request(
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
