"""The robot client: message building and parsing, the shared call policy (retries with jittered backoff,
retryable codes, sizes, TLS), and both clients against real gRPC servers whose first calls fail.

The policy model itself is served in test_policy_server.py; here a small `wmpo.v1.Policy` servicer on a
real gRPC server answers fixed chunks, so failures and retries can be counted exactly.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from wmpo.common.grpc_server import GrpcServer
from wmpo.common.net import free_port
from wmpo.common.tensors import Array, TensorError, decode_image, from_proto, to_proto
from wmpo.robot import (
    RETRYABLE_CODES,
    AsyncPolicyClient,
    ClientOptions,
    PolicyClient,
    PolicyClientError,
    RetryPolicy,
    act_request,
    make_observation,
    parse_address,
    parse_chunk,
    status_code,
)
from wmpo.v1 import common_pb2, policy_pb2, policy_pb2_grpc

IMAGE = {"wrist": np.zeros((8, 8, 3), np.uint8)}
FAST = ClientOptions(timeout_s=5.0, retry=RetryPolicy(retries=3, backoff_s=0.01, max_backoff_s=0.05))


def test_observation_carries_images_proprio_instruction_and_time() -> None:
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    obs = make_observation({"main": image, "wrist": image[:32, :32]}, "open the drawer", [1, 2, 3], timestamp=12.5)
    assert sorted(obs.images) == ["main", "wrist"]
    np.testing.assert_array_equal(decode_image(obs.images["main"]), image)
    np.testing.assert_array_equal(from_proto(obs.proprio, dtype=np.float32), [1, 2, 3])
    assert obs.instruction == "open the drawer"
    assert obs.timestamp.ToNanoseconds() == 12_500_000_000


def test_request_pins_version_and_sampling() -> None:
    request = act_request(
        {"main": np.zeros((4, 4, 3), np.uint8)}, "reach", version=7, temperature=1.6, seed=3,
        return_logprobs=True, encoding="png", request_id="r1",
    )  # fmt: skip
    assert (request.version, request.sampling.seed, request.return_logprobs) == ("7", 3, True)
    assert request.sampling.temperature == pytest.approx(1.6)
    assert request.observation.images["main"].encoding == 2  # PNG
    assert not PolicyClient.build_request({}, "x").sampling.HasField("seed")


def _response(actions: Array, tokens: Array, logprobs: Array | None, version: int = 4) -> policy_pb2.ActResponse:
    chunk = common_pb2.ActionChunk(policy_version=version, policy_sha256="ab" * 32)
    to_proto(actions, out=chunk.actions)
    to_proto(tokens, out=chunk.token_ids)
    if logprobs is not None:
        to_proto(logprobs, out=chunk.logprobs)
    response = policy_pb2.ActResponse(chunk=chunk, request_id="r1")
    response.timing.batch_size = 5
    return response


def test_parse_chunk_decodes_and_validates() -> None:
    actions = np.linspace(-1, 1, 56, dtype=np.float32).reshape(8, 7)
    tokens = np.arange(56, dtype=np.int32).reshape(8, 7)
    parsed = parse_chunk(_response(actions, tokens, np.full((8, 7), -0.5, np.float32)))
    np.testing.assert_array_equal(parsed.actions, actions)
    assert parsed.logprobs is not None and parsed.logprobs.shape == (8, 7)
    assert (parsed.policy_version, parsed.batch_size, parsed.request_id) == (4, 5, "r1")
    assert parse_chunk(_response(actions, tokens, None)).logprobs is None
    with pytest.raises(TensorError, match=r"chunk\.token_ids: expected shape \(8, 7\), got \(8, 6\)"):
        parse_chunk(_response(actions, tokens[:, :6], None))


def test_addresses_and_status_codes() -> None:
    assert parse_address("grpc://robot-gw:50051") == ("robot-gw:50051", False)
    assert parse_address("grpcs://robot-gw:443") == ("robot-gw:443", True)
    assert parse_address("127.0.0.1:1") == ("127.0.0.1:1", False)
    for bad in ("http://x:1", "no-port", "host:abc"):
        with pytest.raises(ValueError, match="address"):
            parse_address(bad)
    assert status_code(3) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(999) == grpc.StatusCode.UNKNOWN


# --- the call policy -------------------------------------------------------------------------------


class _Fixed(random.Random):
    """A random source pinned to one value, to reach the ends of the jitter range."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_is_exponential_capped_and_jitter_stays_in_bounds() -> None:
    policy = RetryPolicy(retries=8, backoff_s=0.1, max_backoff_s=0.5, jitter=0.5)
    rng = random.Random(0)
    for attempt in range(8):
        base = min(0.5, 0.1 * 2**attempt)
        delays = [policy.delay(attempt, rng) for _ in range(500)]
        assert all(0.5 * base <= d <= 1.5 * base for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > 0.5 * base  # really spread, not one value
        assert policy.delay(attempt, _Fixed(0.0)) == pytest.approx(0.5 * base)
        assert policy.delay(attempt, _Fixed(1.0)) == pytest.approx(1.5 * base)
    exact = RetryPolicy(backoff_s=0.2, jitter=0.0)
    assert [exact.delay(n, rng) for n in range(3)] == pytest.approx([0.2, 0.4, 0.8])


def test_retryable_codes_and_attempt_budget() -> None:
    assert frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}) == RETRYABLE_CODES
    policy = RetryPolicy(retries=2)
    assert policy.should_retry(grpc.StatusCode.UNAVAILABLE, 0)
    assert policy.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 1)
    assert not policy.should_retry(grpc.StatusCode.UNAVAILABLE, 2)  # the budget is spent
    final = ("INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "FAILED_PRECONDITION", "INTERNAL")
    for name in final:
        assert not policy.should_retry(grpc.StatusCode[name], 0), name
    for bad in ({"retries": -1}, {"jitter": 1.5}, {"backoff_s": 2.0, "max_backoff_s": 1.0}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    with pytest.raises(ValueError):
        ClientOptions(timeout_s=0)


def test_keyword_shortcuts_amend_one_shared_policy() -> None:
    base = ClientOptions(timeout_s=60.0, retry=RetryPolicy(retries=5, backoff_s=0.2, max_backoff_s=1.0))
    amended = base.override(retries=0, backoff_s=2.0, max_message_bytes=1024)
    assert (amended.timeout_s, amended.retry.retries, amended.retry.backoff_s) == (60.0, 0, 2.0)
    assert amended.retry.max_backoff_s == 2.0 and amended.max_message_bytes == 1024
    assert base.override() == base
    sync = PolicyClient("grpc://127.0.0.1:1", base, timeout=3.0)
    assert sync.options == ClientOptions(timeout_s=3.0, retry=base.retry) and sync.timeout == 3.0
    sync.close()

    async def construct() -> ClientOptions:
        client = AsyncPolicyClient("grpc://127.0.0.1:1", base, timeout=3.0)
        await client.close()
        return client.options

    assert asyncio.run(construct()) == sync.options


# --- against real gRPC servers -------------------------------------------------------------------


class ScriptedPolicy(policy_pb2_grpc.PolicyServicer):
    """A `wmpo.v1.Policy` whose first `failures` calls fail with `code`; then it answers a fixed chunk."""

    def __init__(
        self,
        failures: int = 0,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        cameras: tuple[str, ...] = ("wrist",),
    ) -> None:
        self.failures, self.code, self.cameras = failures, code, cameras
        self.calls: list[str] = []
        self.requests: list[policy_pb2.ActRequest] = []
        self.tokens: list[str] = []
        self._lock = threading.Lock()

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append(method)
            self.tokens += [v for k, v in context.invocation_metadata() if k == "authorization" and isinstance(v, str)]
            failing = len(self.calls) <= self.failures
        if failing:
            context.abort(self.code, f"scripted failure {len(self.calls)}")

    def Act(self, request: policy_pb2.ActRequest, context: grpc.ServicerContext) -> policy_pb2.ActResponse:  # noqa: N802
        self._enter("Act", context)
        self.requests.append(request)
        version = int(request.version or 1)
        actions = np.full((8, 4), 0.5, np.float32)
        return _response(actions, np.ones((8, 4), np.int32), np.full((8, 4), -1.0, np.float32), version=version)

    def StreamAct(  # noqa: N802
        self, request_iterator: Iterator[policy_pb2.ActRequest], context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.StreamActResponse]:
        for request in request_iterator:
            yield policy_pb2.StreamActResponse(request_id=request.request_id, response=self.Act(request, context))

    def GetPolicyInfo(  # noqa: N802
        self, request: policy_pb2.GetPolicyInfoRequest, context: grpc.ServicerContext
    ) -> policy_pb2.PolicyInfo:
        self._enter("GetPolicyInfo", context)
        info = policy_pb2.PolicyInfo()
        info.version.version = int(request.version or 1)
        info.spec.camera_names.extend(self.cameras)
        return info

    def ListVersions(  # noqa: N802
        self, request: policy_pb2.ListVersionsRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ListVersionsResponse:
        self._enter("ListVersions", context)
        return policy_pb2.ListVersionsResponse(current_version=1)


Serve = Callable[..., tuple[ScriptedPolicy, GrpcServer]]


@pytest.fixture
def serve(grpc_server: Callable[..., GrpcServer]) -> Serve:
    """``serve(failures, code, cameras, **server_kwargs)`` -> (servicer, its real server on 127.0.0.1)."""

    def start(
        failures: int = 0,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        cameras: tuple[str, ...] = ("wrist",),
        **server_kwargs: Any,
    ) -> tuple[ScriptedPolicy, GrpcServer]:
        policy = ScriptedPolicy(failures, code, cameras)
        server = grpc_server([lambda s: policy_pb2_grpc.add_PolicyServicer_to_server(policy, s)], **server_kwargs)
        return policy, server

    return start


def test_async_client_retries_unavailable_until_the_server_answers(serve: Serve) -> None:
    policy, server = serve(failures=2)

    async def run() -> Any:
        async with AsyncPolicyClient(f"grpc://{server.address}", FAST, token="robot-token") as client:
            return await client.act(
                IMAGE, "reach", version=3, temperature=1.5, seed=11, return_logprobs=True, request_id="r7"
            )

    chunk = asyncio.run(run())
    assert policy.calls == ["Act"] * 3 and policy.tokens == ["Bearer robot-token"] * 3
    assert chunk.policy_version == 3 and chunk.actions.shape == (8, 4) and chunk.logprobs is not None
    sent = policy.requests[0]
    assert (sent.version, sent.sampling.seed, sent.return_logprobs, sent.request_id) == ("3", 11, True, "r7")
    assert sent.sampling.temperature == pytest.approx(1.5)
    assert list(sent.observation.images) == ["wrist"]


def test_async_client_gives_up_after_its_retries(serve: Serve) -> None:
    policy, server = serve(failures=10)

    async def run() -> None:
        async with AsyncPolicyClient(f"grpc://{server.address}", FAST, retries=2) as client:
            await client.act(IMAGE, "reach")

    with pytest.raises(PolicyClientError) as info:
        asyncio.run(run())
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "scripted failure 3" in str(info.value)
    assert policy.calls == ["Act"] * 3


def test_async_client_waits_for_a_server_that_is_still_starting() -> None:
    """Connection refused (UNAVAILABLE) while the server starts; the retries carry the call through."""
    port, policy = free_port(), ScriptedPolicy()
    server = GrpcServer([lambda s: policy_pb2_grpc.add_PolicyServicer_to_server(policy, s)], port=port)
    options = ClientOptions(timeout_s=5.0, retry=RetryPolicy(retries=12, backoff_s=0.05, max_backoff_s=0.5))

    async def run() -> int:
        async with AsyncPolicyClient(f"grpc://127.0.0.1:{port}", options) as client:
            starter = asyncio.get_running_loop().call_later(0.3, server.start)
            try:
                return (await client.act(IMAGE, "reach", version=2)).policy_version
            finally:
                starter.cancel()

    try:
        began = time.monotonic()
        assert asyncio.run(run()) == 2
        assert 0.3 <= time.monotonic() - began < 10
    finally:
        server.stop(grace=0)


async def _list_versions_async(address: str) -> None:
    async with AsyncPolicyClient(address, FAST) as client:
        await client.list_versions()


@pytest.mark.parametrize(
    ("code", "calls"),
    [(grpc.StatusCode.RESOURCE_EXHAUSTED, 2), (grpc.StatusCode.INVALID_ARGUMENT, 1), (grpc.StatusCode.INTERNAL, 1)],
)
def test_both_clients_retry_the_same_codes(serve: Serve, code: grpc.StatusCode, calls: int) -> None:
    for kind in ("sync", "async"):
        policy, server = serve(failures=1, code=code)
        address = f"grpc://{server.address}"
        try:
            if kind == "sync":
                with PolicyClient(address, FAST) as client:
                    client.list_versions()
            else:
                asyncio.run(_list_versions_async(address))
        except PolicyClientError as exc:
            assert exc.code == code and calls == 1, (kind, exc)
        else:
            assert calls == 2, kind
        assert len(policy.calls) == calls, kind


def test_an_oversized_request_fails_at_once_without_a_call(serve: Serve) -> None:
    policy, server = serve()
    big = {"wrist": np.zeros((256, 256, 3), np.uint8)}  # ~196 KB raw
    with PolicyClient(f"grpc://{server.address}", FAST, max_message_bytes=64 << 10) as client:
        with pytest.raises(PolicyClientError) as info:
            client.act(big, "reach")
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message limit" in str(info.value)
    assert policy.calls == []


def test_camera_lookup_is_shared_and_cached_for_version_numbers(serve: Serve) -> None:
    policy, server = serve()
    address = f"grpc://{server.address}"
    with PolicyClient(address, FAST) as client:
        assert [client.camera(3), client.camera(3), client.camera(""), client.camera("")] == ["wrist"] * 4
    assert policy.calls == ["GetPolicyInfo"] * 3  # version 3 once; "" (the current version) every time

    async def lookup() -> tuple[str, int]:
        async with AsyncPolicyClient(address, FAST) as client:
            camera = await client.camera(5)
            return camera, (await client.info(5)).version.version

    assert asyncio.run(lookup()) == ("wrist", 5)
    assert policy.calls == ["GetPolicyInfo"] * 4

    _, two = serve(cameras=("main", "wrist"))
    with PolicyClient(f"grpc://{two.address}", FAST) as client, pytest.raises(PolicyClientError) as info:
        client.camera(1)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "['main', 'wrist']" in str(info.value)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1/localhost and its key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    yield cert, key


def test_tls_with_a_root_certificate_file_or_bytes(serve: Serve, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    _, server = serve(tls_cert=cert, tls_key=key)
    secure, plain = f"grpcs://{server.address}", f"grpc://{server.address}"

    async def run() -> int:
        async with AsyncPolicyClient(secure, FAST, root_cert=cert) as client:
            return (await client.act(IMAGE, "reach", version=4)).policy_version

    assert asyncio.run(run()) == 4
    with PolicyClient(secure, ClientOptions(root_cert=cert.read_bytes())) as client:
        assert client.act(IMAGE, "reach").actions.shape == (8, 4)
    no_retry = FAST.override(retries=0)
    for address, options in ((plain, no_retry), (secure, no_retry)):  # plaintext; self-signed vs system roots
        with PolicyClient(address, options) as client, pytest.raises(PolicyClientError) as info:
            client.act(IMAGE, "reach")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="grpcs://"):
        PolicyClient(plain, root_cert=cert)
