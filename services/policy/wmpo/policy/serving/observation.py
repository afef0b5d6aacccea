"""Decoding and validating a `wmpo.v1.Observation` against what a policy version expects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from wmpo.common.tensors import Array, TensorError, decode_image, from_proto
from wmpo.v1 import common_pb2

MAX_INSTRUCTION_CHARS = 256


@dataclass
class DecodedObservation:
    images: dict[str, Array]
    proprio: Array
    instruction: str


def decode_observation(msg: common_pb2.Observation, spec: dict[str, Any]) -> DecodedObservation:
    """Check cameras, image sizes, proprio and instruction; `TensorError` naming the field otherwise."""
    images = {}
    for name in spec["camera_names"]:
        if name not in msg.images:
            sent = ", ".join(sorted(msg.images)) or "none"
            raise TensorError(
                "observation.images", f"missing camera {name!r} (the policy expects {spec['camera_names']}; got {sent})"
            )
        images[name] = decode_image(
            msg.images[name],
            field=f"observation.images[{name}]",
            height=spec["image_height"],
            width=spec["image_width"],
            channels=spec["image_channels"],
        )
    dim = spec["proprio_dim"]
    if dim == 0:  # a policy without proprio ignores what a robot sends anyway
        proprio = np.zeros(0, np.float32)
    else:
        proprio = from_proto(msg.proprio, field="observation.proprio", dtype=np.float32, shape=(dim,))
    text = msg.instruction.strip()
    if not text:
        raise TensorError("observation.instruction", "must not be empty")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise TensorError("observation.instruction", f"{len(text)} characters; at most {MAX_INSTRUCTION_CHARS}")
    return DecodedObservation(images, proprio, text)
