"""The robot client: query a wmpo policy server from a robot, a rollout worker or an evaluation.

Imports only grpcio, protobuf and numpy (Pillow too, only if you send JPEG/PNG images), so it runs on
a robot's computer without torch (``pip install ./services/robot``)::

    from wmpo.robot import PolicyClient

    with PolicyClient("grpc://policy.example:50051", token="...") as policy:
        chunk = policy.act({policy.camera(): rgb_uint8_hwc}, "press the button", proprio=state)
        for action in chunk.actions:  # [T, A] in [-1, 1], gripper last
            robot.apply(action)

`AsyncPolicyClient` has the same calls for asyncio; both follow one `ClientOptions` call policy.
"""

from wmpo.robot.aio import AsyncPolicyClient
from wmpo.robot.channel import parse_address
from wmpo.robot.client import PolicyClient
from wmpo.robot.errors import PolicyClientError, status_code
from wmpo.robot.messages import Actions, act_request, make_observation, parse_chunk
from wmpo.robot.options import RETRYABLE_CODES, ClientOptions, RetryPolicy
from wmpo.robot.stream import ActionStream

__all__ = [
    "RETRYABLE_CODES",
    "ActionStream",
    "Actions",
    "AsyncPolicyClient",
    "ClientOptions",
    "PolicyClient",
    "PolicyClientError",
    "RetryPolicy",
    "act_request",
    "make_observation",
    "parse_address",
    "parse_chunk",
    "status_code",
]
