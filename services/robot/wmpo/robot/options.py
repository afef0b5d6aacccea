"""The one call policy both clients follow: which failures are retried and how, deadlines, sizes, TLS roots.

Retried status codes (`RETRYABLE_CODES`):

- ``UNAVAILABLE``: the server is restarting, has no model loaded yet, or the network blipped; nothing was
  done, so trying again is always safe.
- ``RESOURCE_EXHAUSTED``: the policy server's load shedding ("the batching queue is full; retry later",
  see `wmpo.v1.Policy.Act`), which many rollout workers sharing one server do hit. The other meaning of the
  code, a request over the message limit, is deterministic: the clients check a request's size against
  `max_message_bytes` before sending and raise at once, so it is not retried (unless the server's own
  limit is lower than the client's, when it is retried a bounded number of times in vain).

Everything else fails at once: a bad request, an unknown version, a wrong token, and ``DEADLINE_EXCEEDED``
(the per-attempt deadline was already spent, and the server may have done the work).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

import grpc

RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""The policy server's default message limit (`max_message_mb` 16)."""


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after the first for `codes`, with capped exponential backoff and jitter.

    The delay before retry ``n`` (from 0) is ``min(max_backoff_s, backoff_s * 2**n)`` scaled by a uniform
    factor in ``[1 - jitter, 1 + jitter]``, so clients that failed together do not retry together.
    """

    retries: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    jitter: float = 0.5
    codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError(f"need retries >= 0 and 0 <= backoff_s <= max_backoff_s, got {self}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        """Whether a call that failed with `code` on `attempt` (from 0) is tried again."""
        return code in self.codes and attempt < self.retries

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed `attempt` (from 0), jittered."""
        base = min(self.max_backoff_s, self.backoff_s * 2.0**attempt)
        u = (rng or random).random()
        return base * (1.0 - self.jitter + 2.0 * self.jitter * u)


@dataclass(frozen=True)
class ClientOptions:
    """How a client calls: per-attempt deadline, retries, message size limit, and the TLS roots.

    TLS is chosen by the address: ``grpcs://host:port`` verifies the server against `root_cert` (a PEM file
    or its bytes) or, when None, the system's roots; ``grpc://`` (or a bare ``host:port``) is plaintext.
    """

    timeout_s: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    root_cert: Path | bytes | None = None

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_message_bytes <= 0:
            raise ValueError(f"timeout_s and max_message_bytes must be positive, got {self}")

    def override(
        self,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        backoff_s: float | None = None,
        max_message_bytes: int | None = None,
        root_cert: Path | bytes | None = None,
    ) -> ClientOptions:
        """These options with the given (non-None) values replaced: the clients' keyword shortcuts."""
        retry = self.retry
        if retries is not None or backoff_s is not None:
            backoff = retry.backoff_s if backoff_s is None else backoff_s
            retry = dataclasses.replace(
                retry,
                retries=retry.retries if retries is None else retries,
                backoff_s=backoff,
                max_backoff_s=max(retry.max_backoff_s, backoff),
            )
        return dataclasses.replace(
            self,
            timeout_s=self.timeout_s if timeout is None else timeout,
            retry=retry,
            max_message_bytes=self.max_message_bytes if max_message_bytes is None else max_message_bytes,
            root_cert=self.root_cert if root_cert is None else root_cert,
        )

    def root_cert_bytes(self) -> bytes | None:
        """The trusted roots as PEM bytes (None: the system's)."""
        return Path(self.root_cert).read_bytes() if isinstance(self.root_cert, Path) else self.root_cert
