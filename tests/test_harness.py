"""The test harness itself: real Redis, real Triton (inference over gRPC with tritonclient), real gRPC."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
import redis

from wmpo.common.grpc_server import GrpcServer
from wmpo.common.redis_server import RedisServer, RedisServerNotFoundError, find_redis_server
from wmpo.common.triton import TritonPorts


@pytest.mark.redis
def test_redis_fixture_is_a_real_server_with_streams(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.set("leftover", "1")  # the next test must not see it
    major = int(str(client.info("server")["redis_version"]).split(".")[0])
    assert major >= 6  # XAUTOCLAIM (job reclaim) needs Redis 6.2
    client.xgroup_create("jobs", "workers", id="0", mkstream=True)
    client.xadd("jobs", {"job": "a"})
    client.xreadgroup("workers", "w1", {"jobs": ">"}, count=1)
    _next, claimed, *_ = client.xautoclaim("jobs", "workers", "w2", min_idle_time=0, start_id="0")
    assert [fields for _id, fields in claimed] == [{b"job": b"a"}]


@pytest.mark.redis
def test_redis_is_flushed_between_tests(redis_url: str) -> None:
    assert redis.Redis.from_url(redis_url).get("leftover") is None


def test_redis_server_process_stops_and_frees_its_port() -> None:
    server = RedisServer().start()
    port, proc = server.port, server.process
    assert proc is not None
    server.stop()
    assert proc.poll() is not None
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, socket_connect_timeout=0.5).ping()


def test_missing_redis_binary_is_one_readable_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WMPO_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(
        RedisServerNotFoundError, match="WMPO_REDIS_SERVER=/nonexistent/redis-server is not an executable"
    ):
        find_redis_server()


@pytest.mark.triton
def test_triton_fixture_infers_over_grpc(triton_server: TritonPorts) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=triton_server.grpc_url)
    assert client.is_server_ready()
    assert client.is_model_ready("double")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("double", [inp], outputs=[grpcclient.InferRequestedOutput("y")])
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
    config = client.get_model_config("double", as_json=True)["config"]
    assert "dynamic_batching" in config
    client.close()


@pytest.mark.triton
def test_triton_serves_kserve_http_and_metrics(triton_server: TritonPorts) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{triton_server.http_url}/v2/health/ready", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(triton_server.metrics_url, timeout=5) as response:
        assert b"nv_inference_request_success" in response.read()


def test_grpc_server_helper_serves_health_on_a_free_port(grpc_server: Callable[..., GrpcServer]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = grpc_server(service_names=["wmpo.v1.Policy"])
    assert server.port > 0
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="wmpo.v1.Policy")
        assert stub.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
        server.set_serving()
        assert stub.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_server_reports_a_taken_port(grpc_server: Callable[..., GrpcServer]) -> None:
    from wmpo.common.errors import UserError

    first = grpc_server()
    with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{first.port}"):
        GrpcServer([], host="127.0.0.1", port=first.port)
