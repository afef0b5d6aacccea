"""The gRPC policy server against real clients: batching, errors, auth, health, hot swap, streaming."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from policy_fixtures import make_checkpoint, observation, start_server

from wmpo.common.net import free_port
from wmpo.common.registry import Registry
from wmpo.common.tensors import Array, encode_image, to_proto
from wmpo.policy.checkpoint import load_policy, save_policy
from wmpo.policy.serving.server import PolicyServer
from wmpo.robot import Actions, PolicyClient, PolicyClientError
from wmpo.v1 import policy_pb2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "policy")
    return path


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[PolicyServer]:
    srv = start_server(checkpoint=checkpoint, max_batch_size=32, metrics_port=free_port())
    yield srv
    srv.stop(grace=1)


@pytest.fixture
def client(server: PolicyServer) -> Iterator[PolicyClient]:
    with PolicyClient(f"grpc://{server.address}", timeout=30) as c:
        yield c


def test_act_logprobs_match_a_fresh_forward(client: PolicyClient, checkpoint: Path) -> None:
    images, proprio = observation(1)
    chunk = client.act(images, "press the button", proprio, temperature=1.6, seed=11, return_logprobs=True)
    assert chunk.actions.shape == (8, 4) and chunk.logprobs is not None and chunk.policy_version == 0
    bundle = load_policy(checkpoint)
    inputs = bundle.prepare([images], [proprio], ["press the button"])
    fresh = bundle.logprobs(inputs, torch.from_numpy(np.array(chunk.token_ids[None])).long(), 1.6).detach().numpy()[0]
    assert np.abs(fresh - chunk.logprobs).max() <= 1e-5
    again = client.act(images, "press the button", proprio, temperature=1.6, seed=11)
    np.testing.assert_array_equal(again.token_ids, chunk.token_ids)
    assert again.logprobs is None


def test_concurrent_clients_are_batched(server: PolicyServer, client: PolicyClient) -> None:
    images, proprio = observation(2)
    results: list[int] = []
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            results.append(client.act(images, "reach the red goal", proprio, temperature=1.0, seed=i).batch_size)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 32
    assert max(results) > 1, results
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        body = response.read().decode()
    count = float(body.split("wmpo_policy_batch_size_count ")[1].split()[0])
    total = float(body.split("wmpo_policy_batch_size_sum ")[1].split()[0])
    assert total / count > 1
    assert 'wmpo_policy_requests_total{status="OK",version="0"}' in body


MIXED = ["go", "press the button", "reach past the red goal, then press the big green button on the far wall"]


@pytest.fixture(scope="module")
def sharp_checkpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint with every weight matrix at std 1/sqrt(fan-in), the scale of a trained model (the 0.02
    init makes attention nearly uniform, which hides how much the positions matter)."""
    bundle = load_policy(checkpoint)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in bundle.model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    return save_policy(bundle, tmp_path_factory.mktemp("sharp") / "policy")


def test_batched_requests_with_mixed_instructions_get_what_they_get_alone(sharp_checkpoint: Path) -> None:
    """Issue 13: a robot's chunk must not depend on the instructions of the requests batched with it."""
    checkpoint = sharp_checkpoint
    jobs = [(i, text, temperature) for i, text in enumerate(MIXED) for temperature in (0.0, 1.6)]
    alone_srv = start_server(checkpoint=checkpoint, max_batch_size=1)
    # Waits up to 5 s for the batch to fill: all six requests share one forward pass.
    batch_srv = start_server(checkpoint=checkpoint, max_batch_size=len(jobs), max_batch_wait_ms=5000.0)
    try:

        def act(client: PolicyClient, job: tuple[int, str, float]) -> Actions:
            i, text, temperature = job
            images, proprio = observation(30 + i)
            return client.act(images, text, proprio, temperature=temperature, seed=100 + i, return_logprobs=True)

        with PolicyClient(f"grpc://{alone_srv.address}", timeout=30) as client:
            alone = [act(client, job) for job in jobs]
        assert [chunk.batch_size for chunk in alone] == [1] * len(jobs)

        together: dict[int, Actions] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(jobs))
        with PolicyClient(f"grpc://{batch_srv.address}", timeout=30) as client:

            def call(k: int) -> None:
                try:
                    barrier.wait(timeout=10)
                    together[k] = act(client, jobs[k])
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=call, args=(k,)) for k in range(len(jobs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not errors, errors
        assert sorted(together) == list(range(len(jobs))) and {c.batch_size for c in together.values()} == {len(jobs)}
        for k, (job, one) in enumerate(zip(jobs, alone, strict=True)):
            many = together[k]
            assert many.logprobs is not None and one.logprobs is not None
            np.testing.assert_array_equal(many.token_ids, one.token_ids, err_msg=str(job))
            np.testing.assert_array_equal(many.actions, one.actions, err_msg=str(job))
            assert np.abs(many.logprobs - one.logprobs).max() <= 1e-5, job
    finally:
        alone_srv.stop(grace=1)
        batch_srv.stop(grace=1)


def _raw_act(address: str, request: policy_pb2.ActRequest, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError:
    from wmpo.v1 import policy_pb2_grpc

    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(address, options=options) as channel, pytest.raises(grpc.RpcError) as info:
        policy_pb2_grpc.PolicyStub(channel).Act(request, timeout=10, metadata=metadata)
    return info.value


def _request(images: dict[str, Array], proprio: Array, text: str = "reach") -> policy_pb2.ActRequest:
    return PolicyClient.build_request(images, text, proprio)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.observation.images["main"].CopyFrom(encode_image(np.zeros((32, 64, 3), np.uint8))),
         "observation.images[main]: expected shape (64, 64, 3), got (32, 64, 3)"),
        (lambda r: r.observation.images["main"].MergeFrom(r.observation.images["main"].__class__(channels=4)),
         "observation.images[main]: channels must be 1 or 3"),
        (lambda r: r.observation.images["main"].CopyFrom(encode_image(np.zeros((512, 512, 3), np.uint8))),
         "observation.images[main]: expected shape (64, 64, 3), got (512, 512, 3)"),
        (lambda r: r.observation.images.pop("main") and r.observation.images["wrist"].CopyFrom(
            encode_image(np.zeros((64, 64, 3), np.uint8))), "missing camera 'main'"),
        (lambda r: to_proto(np.array([0, np.nan, 0, 0], np.float32), out=r.observation.proprio),
         "observation.proprio: 1 non-finite value(s)"),
        (lambda r: to_proto(np.zeros(4, np.float64), out=r.observation.proprio),
         "observation.proprio: expected dtype float32, got float64"),
        (lambda r: to_proto(np.zeros(7, np.float32), out=r.observation.proprio),
         "observation.proprio: expected shape (4,), got (7,)"),
        (lambda r: setattr(r.observation, "instruction", "  "), "observation.instruction: must not be empty"),
        (lambda r: setattr(r.sampling, "temperature", -1.0), "sampling.temperature"),
        (lambda r: setattr(r, "version", "bad version!"), "version must be a number or an alias"),
    ],
)  # fmt: skip
def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(
    server: PolicyServer,
    client: PolicyClient,
    mutate: Callable[[policy_pb2.ActRequest], object],
    field: str,
) -> None:
    images, proprio = observation(3)
    request = _request(images, proprio)
    mutate(request)
    error = _raw_act(server.address, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in (error.details() or "")
    assert client.act(images, "reach", proprio).actions.shape == (8, 4)


def test_oversized_messages_and_unknown_versions(server: PolicyServer, client: PolicyClient) -> None:
    images, proprio = observation(4)
    request = _request(images, proprio)
    request.observation.images["main"].data = bytes(17 << 20)  # over the 16 MiB message limit
    assert _raw_act(server.address, request).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(PolicyClientError) as info:
        client.act(images, "reach", proprio, version=3)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "fixed checkpoint" in str(info.value)
    assert client.act(images, "reach", proprio).actions.shape == (8, 4)


def test_bearer_tokens(checkpoint: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# robots\nsecret-robot-token\n")
    srv = start_server(checkpoint=checkpoint, auth_tokens_file=tokens)
    images, proprio = observation(5)
    try:
        for token in (None, "wrong"):
            with (
                PolicyClient(f"grpc://{srv.address}", token=token) as anonymous,
                pytest.raises(PolicyClientError) as info,
            ):
                anonymous.act(images, "reach", proprio)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with PolicyClient(f"grpc://{srv.address}", token="secret-robot-token") as robot:
            assert robot.act(images, "reach", proprio).actions.shape == (8, 4)
            assert robot.list_versions().versions[0].resident
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(srv.address) as channel:  # health needs no token
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="wmpo.v1.Policy"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop(grace=1)


def test_registry_hot_swap_while_streaming(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    registry = Registry(tmp_path / "registry", "policy")
    srv = start_server(registry=str(tmp_path / "registry"), poll_interval_s=0.1)
    images, proprio = observation(6)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="wmpo.v1.Policy")
            assert health.Check(check).status == health_pb2.HealthCheckResponse.NOT_SERVING
            client = PolicyClient(f"grpc://{srv.address}", retries=0)
            with pytest.raises(PolicyClientError) as info:
                client.act(images, "reach", proprio)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            registry.publish(make_checkpoint(tmp_path / "v1", seed=1))
            _wait(lambda: srv.versions.current is not None)
            _wait(lambda: health.Check(check).status == health_pb2.HealthCheckResponse.SERVING)

        seen: list[int] = []
        errors: list[PolicyClientError] = []
        stop = threading.Event()

        def requests() -> Iterator[policy_pb2.ActRequest]:
            while not stop.is_set():
                yield PolicyClient.build_request(images, "reach", proprio)
                time.sleep(0.01)

        def stream() -> None:
            for result in client.stream(requests()):
                if isinstance(result, PolicyClientError):
                    errors.append(result)
                else:
                    seen.append(result.policy_version)

        readers = [threading.Thread(target=stream) for _ in range(4)]
        for r in readers:
            r.start()
        _wait(lambda: len(seen) > 20)
        registry.publish(make_checkpoint(tmp_path / "v2", seed=2))
        _wait(lambda: seen[-1] == 2 and len([v for v in seen if v == 2]) > 20)
        stop.set()
        for r in readers:
            r.join(timeout=10)
        assert not errors, errors[:3]
        assert seen[0] == 1 and seen[-1] == 2 and set(seen) == {1, 2}
        assert client.act(images, "reach", proprio, version=1).policy_version == 1  # pinned v1 still works
        assert client.act(images, "reach", proprio, version="latest").policy_version == 2
        with pytest.raises(PolicyClientError) as missing:
            client.act(images, "reach", proprio, version=99)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        listed = client.list_versions()
        assert (listed.current_version, listed.following) == (2, "latest")
        assert [v.aliases for v in listed.versions] == [[], ["latest"]]
        assert client.info(1).spec.chunk_length == 8
        client.close()
    finally:
        srv.stop(grace=1)


def test_a_corrupted_version_is_refused_and_the_current_keeps_serving(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry", "policy")
    registry.publish(make_checkpoint(tmp_path / "v1", seed=1))
    srv = start_server(registry=str(tmp_path / "registry"), poll_interval_s=3600)
    images, proprio = observation(7)
    try:
        info = registry.publish(make_checkpoint(tmp_path / "v2", seed=2))
        weights = Path(info.path) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100] + bytes(100))
        assert srv.versions.refresh() is False
        assert 2 in srv.versions.refused and "sha256" in srv.versions.refused[2]
        with PolicyClient(f"grpc://{srv.address}") as client:
            assert client.act(images, "reach", proprio).policy_version == 1
            with pytest.raises(PolicyClientError) as refused:
                client.act(images, "reach", proprio, version=2)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        srv.stop(grace=1)


def test_action_stream_refills_before_running_out(client: PolicyClient) -> None:
    images, proprio = observation(8)
    actions = []
    with client.action_stream("push the puck", refill_at=4) as stream:
        for _ in range(40):  # a robot at ~25 Hz: each action takes 40 ms to execute
            actions.append(stream.next_action(images, proprio))
            time.sleep(0.04)
    assert all(a.shape == (4,) for a in actions)
    assert stream.chunks_received >= 5
    assert stream.waits < stream.chunks_received  # mostly refilled ahead of need


def test_retries_give_up_on_a_dead_server_with_unavailable() -> None:
    port = free_port()
    started = time.perf_counter()
    client = PolicyClient(f"grpc://127.0.0.1:{port}", retries=2, backoff_s=0.05, timeout=2)
    with client, pytest.raises(PolicyClientError) as info:
        client.act(observation(9)[0], "reach")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.perf_counter() - started < 10


def test_wmpo_eval_drives_the_simulator_through_the_server_and_from_a_checkpoint(
    server: PolicyServer, checkpoint: Path
) -> None:
    for source in (f"grpc://{server.address}", str(checkpoint)):
        result = subprocess.run(
            [sys.executable, "-m", "wmpo.common.cli", "eval", "--policy", source, "--task", "reach", "--episodes",
             "1", "--workers", "1", "--json"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert '"episodes": 1' in result.stdout


def _wait(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in time: {condition.__code__.co_firstlineno}"
        time.sleep(0.05)


def test_tls(checkpoint: Path, tmp_path: Path) -> None:
    """A server with --tls-cert/--tls-key answers a grpcs:// client that trusts its certificate."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    srv = start_server(checkpoint=checkpoint, tls_cert=cert, tls_key=key)
    try:
        with PolicyClient(f"grpcs://{srv.address}", root_cert=cert) as client:
            images, proprio = observation(10)
            assert client.act(images, "reach", proprio).actions.shape == (8, 4)
        with PolicyClient(f"grpc://{srv.address}", retries=0, timeout=3) as plaintext, pytest.raises(PolicyClientError):
            plaintext.act(observation(10)[0], "reach")
    finally:
        srv.stop(grace=1)
