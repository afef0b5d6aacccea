"""`PolicyClientError`: how every failed policy call surfaces, with its gRPC status code."""

from __future__ import annotations

import grpc


class PolicyClientError(RuntimeError):
    """A failed policy call: `code` is the gRPC status code, the message the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


def status_code(code: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` of a numeric code (as carried by `StreamError.code`); UNKNOWN if invalid."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def from_rpc_error(exc: grpc.RpcError) -> PolicyClientError:
    """The `PolicyClientError` for a failed sync or asyncio call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return PolicyClientError(code, details or "")
