"""Building, binding and stopping gRPC servers the same way in every service (and in tests).

`GrpcServer` wraps a `grpc.Server` with the project's defaults (message size limits, keepalive,
standard health service, optional reflection and TLS) and a clear error when the port is taken.
`abort_with` turns exceptions into gRPC status codes with readable messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import grpc

from wmpo.common.errors import UserError
from wmpo.common.tensors import TensorError

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Registrar = Callable[[grpc.Server], Any]
"""A function that adds servicers to a server, e.g. ``lambda s: add_PolicyServicer_to_server(impl, s)``."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code a service answers for an exception raised while handling a request."""
    if isinstance(exc, TensorError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED if exc.too_large else grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, KeyError | LookupError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, ConnectionError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def abort_with(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """Abort the RPC with the status `status_for(exc)` and the exception's message."""
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    context.abort(status_for(exc), message or type(exc).__name__)
    raise AssertionError("unreachable: context.abort raises")  # for type checkers


class GrpcServer:
    """A gRPC server on `host:port` (port 0 = pick a free one) with the standard health service.

    ``health`` is the `grpc_health.v1` servicer: services mark themselves SERVING when ready.
    """

    def __init__(
        self,
        registrars: Sequence[Registrar],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 32,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        service_names: Sequence[str] = (),
        reflection: bool = True,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            options=options,
            interceptors=list(interceptors),
        )
        for register in registrars:
            register(self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names = list(service_names)
        for name in ["", *self._service_names]:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if reflection:
            from grpc_reflection.v1alpha import reflection as refl

            refl.enable_server_reflection(
                [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 refl.SERVICE_NAME],
                self.server,
            )  # fmt: skip
        self.host = host
        address = f"{host}:{port}"
        try:
            if tls_cert is not None or tls_key is not None:
                if tls_cert is None or tls_key is None:
                    raise UserError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
                creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio raises RuntimeError when it cannot bind
            raise UserError(f"cannot listen on {address}: {exc}") from None
        if self.port == 0:
            raise UserError(f"cannot listen on {address}: the port is in use or the address is invalid")

    @property
    def address(self) -> str:
        """``host:port`` clients dial."""
        return f"{self.host}:{self.port}"

    def set_serving(self, serving: bool = True) -> None:
        """Report SERVING (or NOT_SERVING) for the server and each named service via grpc.health.v1."""
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._service_names]:
            self.health.set(name, status)

    def start(self) -> GrpcServer:
        self.server.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting calls, let in-flight calls finish for up to `grace` seconds."""
        self.set_serving(False)
        self.server.stop(grace).wait()

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(grace=1.0)
