"""`AsyncPolicyClient`: the asyncio client of the `wmpo.v1.Policy` service, with `PolicyClient`'s calls.

Many concurrent `act` calls on one client share one channel; the policy server micro-batches them. This is
what rollout workers use (pinned version, temperature, seed and log-probs per call).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import TypeVar

import grpc
import numpy.typing as npt
from google.protobuf.message import Message

from wmpo.common.tensors import ImageEncodingName
from wmpo.robot.base import ClientBase
from wmpo.robot.channel import check_size, open_aio_channel
from wmpo.robot.errors import from_rpc_error
from wmpo.robot.messages import Actions, act_request, parse_chunk, single_camera
from wmpo.v1 import policy_pb2, policy_pb2_grpc

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp")


class AsyncPolicyClient(ClientBase):
    """An asyncio connection to a policy server; same arguments and call policy as `PolicyClient`.

    Create, use and close it on one event loop (``async with AsyncPolicyClient(...) as policy:``).
    """

    def _connect(self) -> None:
        self._channel = open_aio_channel(self.address, self.options)
        self._stub = policy_pb2_grpc.PolicyStub(self._channel)

    async def _call(self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req) -> Resp:
        """A unary call with the deadline and the token, retried as `options.retry` says."""
        check_size(request, self.options)
        retry, attempt = self.options.retry, 0
        while True:
            try:
                return await method(request, timeout=self.options.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if not retry.should_retry(error.code, attempt):
                    raise error from None
            await asyncio.sleep(retry.delay(attempt))
            attempt += 1

    async def act(
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
        return parse_chunk(await self._call(self._stub.Act, request))

    async def info(self, version: str | int = "") -> policy_pb2.PolicyInfo:
        """What `version` expects (cameras, image size, proprio) and produces; cached for version numbers."""
        info = self._cached_info(version)
        if info is None:
            request = policy_pb2.GetPolicyInfoRequest(version=str(version))
            info = self._remember(version, await self._call(self._stub.GetPolicyInfo, request))
        return info

    async def camera(self, version: str | int = "") -> str:
        """The name of the one camera `version` expects (FAILED_PRECONDITION if it expects several)."""
        return single_camera(await self.info(version), version)

    async def list_versions(self) -> policy_pb2.ListVersionsResponse:
        """The versions the server can serve, with aliases and residency."""
        return await self._call(self._stub.ListVersions, policy_pb2.ListVersionsRequest())

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncPolicyClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
