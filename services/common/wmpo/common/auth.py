"""Bearer-token authentication for gRPC servers.

Clients send ``authorization: Bearer <token>``; calls without a valid token fail with UNAUTHENTICATED.
Health checking and reflection stay open (load balancers and grpcurl need them without secrets).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from wmpo.common.errors import UserError

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def load_tokens(path: Path) -> list[str]:
    """One token per line; blank lines and ``#`` comments ignored. `UserError` when none or unreadable."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read auth tokens file {path}: {exc.strerror}") from None
    tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise UserError(f"auth tokens file {path} holds no token")
    return tokens


def first_token(path: Path | None) -> str | None:
    """The token a client sends: the first of `path` (as `load_tokens` reads it); None when no file is set."""
    return None if path is None else load_tokens(path)[0]


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls whose bearer token is not one of `tokens` (constant-time comparison)."""

    def __init__(self, tokens: Iterable[str], open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        self._tokens = [t.encode() for t in tokens]
        self._open = open_prefixes

    def _authorized(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else str(value)
                scheme, _, token = text.partition(" ")
                if scheme.lower() == "bearer":
                    candidate = token.strip().encode()
                    return any(hmac.compare_digest(candidate, t) for t in self._tokens)
        return False

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = details.method
        if method.startswith(self._open) or self._authorized(details.invocation_metadata):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None

        def deny(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization: Bearer <token>)"
            )

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
