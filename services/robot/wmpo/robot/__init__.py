"""The robot client: query a wmpo policy server from a robot.

Imports only grpcio, protobuf and numpy (Pillow too, only if you send JPEG/PNG images), so it runs on
a robot's computer without torch::

    from wmpo.robot import PolicyClient

    with PolicyClient("grpc://policy.example:50051", token="...") as policy:
        chunk = policy.act({"main": rgb_uint8_hwc}, "press the button", proprio=state)
        for action in chunk.actions:  # [T, A] in [-1, 1], gripper last
            robot.apply(action)
"""

from wmpo.robot.client import (
    Actions,
    ActionStream,
    PolicyClient,
    PolicyClientError,
    make_observation,
    parse_chunk,
)

__all__ = ["ActionStream", "Actions", "PolicyClient", "PolicyClientError", "make_observation", "parse_chunk"]
