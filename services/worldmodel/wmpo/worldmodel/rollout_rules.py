"""The rules of an imagined episode, shared by the Imagination API and the trainer's rollout workers.

An episode starts from up to K real frames (the first repeated to fill K). Every step the world model
imagines F frames for F actions; each new frame is scored by the reward model over the N-frame clip that
ends at it; the first frame whose success probability reaches the threshold ends the episode with reward 1,
otherwise the horizon (in frames) ends it with reward 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wmpo.common.tensors import Array


def start_buffers(frames: Array, context_len: int, clip_len: int) -> tuple[Array, Array]:
    """Real start frames [n ≤ K, H, W, C] -> (context [K, ...], reward history [N, ...]), padded with the first."""
    if len(frames) == 0:
        raise ValueError("an imagined episode needs at least one start frame")
    frames = frames[-context_len:]
    context = np.concatenate([np.repeat(frames[:1], context_len - len(frames), axis=0), frames])
    history = np.concatenate([np.repeat(context[:1], max(0, clip_len - context_len), axis=0), context])
    return context, history[-clip_len:]


def trailing_clips(history: Array, frames: Array, clip_len: int) -> Array:
    """The N-frame clip ending at each new frame: history [N, ...] + frames [F, ...] -> clips [F, N, ...]."""
    joined = np.concatenate([history, frames])
    start = len(history)
    return np.stack([joined[start + j + 1 - clip_len : start + j + 1] for j in range(len(frames))])


@dataclass(frozen=True)
class ChunkOutcome:
    """What is kept of one imagined chunk, and whether the episode ended."""

    frames: Array  # the kept frames [k, H, W, C]
    probs: Array  # their success probabilities [k]
    success: bool  # a kept frame reached the threshold (the last kept one)
    truncated: bool  # the horizon ended the episode without success

    @property
    def done(self) -> bool:
        return self.success or self.truncated


def cut_chunk(frames: Array, probs: Array, threshold: float, remaining: int) -> ChunkOutcome:
    """Keep frames up to the first success or the horizon (`remaining` frames left), whichever is first."""
    if remaining <= 0:
        raise ValueError("the episode has no frames left before its horizon")
    keep = min(len(frames), remaining)
    hits = np.flatnonzero(probs[:keep] >= threshold)
    success = bool(hits.size)
    if success:
        keep = int(hits[0]) + 1
    truncated = not success and keep >= remaining
    return ChunkOutcome(frames[:keep], probs[:keep], success, truncated)


def roll_buffers(context: Array, history: Array, frames: Array) -> tuple[Array, Array]:
    """Append kept frames to the context (last K) and the reward history (last N)."""
    return (
        np.concatenate([context, frames])[-len(context) :],
        np.concatenate([history, frames])[-len(history) :],
    )
