"""The robot client's message building and parsing (its RPCs are tested against the real policy server)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from wmpo.common.tensors import Array, TensorError, decode_image, from_proto, to_proto
from wmpo.robot import make_observation, parse_chunk
from wmpo.robot.client import PolicyClient, parse_address, status_code
from wmpo.v1 import common_pb2, policy_pb2


def test_observation_carries_images_proprio_instruction_and_time() -> None:
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    obs = make_observation({"main": image, "wrist": image[:32, :32]}, "open the drawer", [1, 2, 3], timestamp=12.5)
    assert sorted(obs.images) == ["main", "wrist"]
    np.testing.assert_array_equal(decode_image(obs.images["main"]), image)
    np.testing.assert_array_equal(from_proto(obs.proprio, dtype=np.float32), [1, 2, 3])
    assert obs.instruction == "open the drawer"
    assert obs.timestamp.ToNanoseconds() == 12_500_000_000


def test_request_pins_version_and_sampling() -> None:
    request = PolicyClient.build_request(
        {"main": np.zeros((4, 4, 3), np.uint8)}, "reach", version=7, temperature=1.6, seed=3,
        return_logprobs=True, encoding="png", request_id="r1",
    )  # fmt: skip
    assert (request.version, request.sampling.seed, request.return_logprobs) == ("7", 3, True)
    assert request.sampling.temperature == pytest.approx(1.6)
    assert request.observation.images["main"].encoding == 2  # PNG
    assert not PolicyClient.build_request({}, "x").sampling.HasField("seed")


def _response(actions: Array, tokens: Array, logprobs: Array | None) -> policy_pb2.ActResponse:
    chunk = common_pb2.ActionChunk(policy_version=4, policy_sha256="ab" * 32)
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
