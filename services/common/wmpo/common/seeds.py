"""Derived seeds: one episode seed gives each of its steps a distinct, reproducible seed."""

from __future__ import annotations

STRIDE = 100_003
"""Seeds of consecutive steps of one episode; a prime, so the steps of different episodes do not collide."""


def step_seed(episode_seed: int, step: int) -> int:
    """The seed of step `step` (a policy chunk or a world-model frame count) of the episode seeded `episode_seed`."""
    return (episode_seed * STRIDE + step) % 2**63
