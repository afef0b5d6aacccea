"""The test harness: real servers, started by fixtures and stopped when done.

- `redis_server` / `redis_url`: one real redis-server per test session on a free port; `redis_url`
  flushes it before each test that uses it.
- `triton_server`: one real Triton server (PyTriton) per session serving a trivial model `double`
  (y = 2x, dynamic batching), on free gRPC/HTTP/metrics ports.
- `grpc_server`: start in-process gRPC servers (`wmpo.common.grpc_server.GrpcServer`) on free ports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from wmpo.common.grpc_server import GrpcServer, Registrar
from wmpo.common.net import free_port
from wmpo.common.redis_server import RedisServer
from wmpo.common.tensors import Array
from wmpo.common.triton import TritonPorts, start_triton

TRIVIAL_MODEL = "double"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole test session (no persistence)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session's Redis, emptied (FLUSHALL) before the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


def _bind_double(triton: Any) -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    @batch  # type: ignore[untyped-decorator]
    def infer(x: Array) -> dict[str, Array]:
        return {"y": (x * 2).astype(np.float32)}

    triton.bind(
        model_name=TRIVIAL_MODEL,
        infer_func=infer,
        inputs=[Tensor(name="x", dtype=np.float32, shape=(-1,))],
        outputs=[Tensor(name="y", dtype=np.float32, shape=(-1,))],
        config=ModelConfig(max_batch_size=16, batcher=DynamicBatcher(max_queue_delay_microseconds=1000)),
        strict=True,
    )


@pytest.fixture(scope="session")
def triton_server() -> Iterator[TritonPorts]:
    """A real Triton server serving `double`, for the whole test session."""
    ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
    triton = start_triton(_bind_double, ports, bind_address="127.0.0.1")
    try:
        yield ports
    finally:
        triton.stop()


@pytest.fixture
def grpc_server() -> Iterator[Callable[..., GrpcServer]]:
    """A factory: ``grpc_server([registrar, ...], **kwargs)`` starts a server on a free port.

    Every server it started is stopped after the test.
    """
    started: list[GrpcServer] = []

    def start(registrars: Sequence[Registrar] = (), **kwargs: Any) -> GrpcServer:
        server = GrpcServer(registrars, host="127.0.0.1", port=0, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=0.5)
