"""`PolicyClient`: the blocking client of the `wmpo.v1.Policy` service, numpy in, numpy out."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import TypeVar

import grpc
import numpy.typing as npt
from google.protobuf.message import Message

from wmpo.common.tensors import ImageEncodingName
from wmpo.robot.base import ClientBase
from wmpo.robot.channel import check_size, open_channel
from wmpo.robot.errors import PolicyClientError, from_rpc_error, status_code
from wmpo.robot.messages import Actions, act_request, parse_chunk, single_camera
from wmpo.robot.stream import ActionStream
from wmpo.v1 import policy_pb2, policy_pb2_grpc

__all__ = ["PolicyClient", "PolicyClientError"]

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp")


class PolicyClient(ClientBase):
    """A blocking connection to a policy server. Thread-safe; reuse one per process.

    `address` is ``grpc://host:port`` (plaintext) or ``grpcs://host:port`` (TLS). `options` is the call
    policy (`ClientOptions`: per-attempt deadline, retries with jittered backoff, message limit, TLS roots);
    the keyword shortcuts `timeout`, `retries`, `backoff_s`, `max_message_bytes`, `root_cert` amend it.
    """

    def _connect(self) -> None:
        self._channel = open_channel(self.address, self.options)
        self._stub = policy_pb2_grpc.PolicyStub(self._channel)

    def _call(self, method: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req) -> Resp:
        """A unary call with the deadline and the token, retried as `options.retry` says."""
        check_size(request, self.options)
        retry, attempt = self.options.retry, 0
        while True:
            try:
                return method(request, timeout=self.options.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if not retry.should_retry(error.code, attempt):
                    raise error from None
            time.sleep(retry.delay(attempt))
            attempt += 1

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
        request = act_request(
            images, instruction, proprio, version=version, temperature=temperature, seed=seed,
            return_logprobs=return_logprobs, encoding=encoding, request_id=request_id,
        )  # fmt: skip
        return parse_chunk(self._call(self._stub.Act, request))

    def info(self, version: str | int = "") -> policy_pb2.PolicyInfo:
        """What `version` expects (cameras, image size, proprio) and produces; cached for version numbers."""
        info = self._cached_info(version)
        if info is None:
            request = policy_pb2.GetPolicyInfoRequest(version=str(version))
            info = self._remember(version, self._call(self._stub.GetPolicyInfo, request))
        return info

    def camera(self, version: str | int = "") -> str:
        """The name of the one camera `version` expects (FAILED_PRECONDITION if it expects several)."""
        return single_camera(self.info(version), version)

    def list_versions(self) -> policy_pb2.ListVersionsResponse:
        """The versions the server can serve, with aliases and residency."""
        return self._call(self._stub.ListVersions, policy_pb2.ListVersionsRequest())

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
            raise from_rpc_error(exc) from None

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
