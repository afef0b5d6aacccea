"""What the sync and the asyncio client share: resolved options, call metadata, pinned versions' info."""

from __future__ import annotations

from pathlib import Path

from wmpo.robot.channel import bearer_metadata
from wmpo.robot.messages import act_request, is_pinned
from wmpo.robot.options import ClientOptions
from wmpo.v1 import policy_pb2


class ClientBase:
    """A policy client's state; the subclasses open the channel (`_connect`) and make the calls.

    `options` is the call policy (see `ClientOptions`); the keyword shortcuts replace single fields of it.
    `token` is sent as ``authorization: Bearer <token>``.
    """

    build_request = staticmethod(act_request)

    def __init__(
        self,
        address: str,
        options: ClientOptions | None = None,
        *,
        token: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        backoff_s: float | None = None,
        max_message_bytes: int | None = None,
        root_cert: Path | bytes | None = None,
    ) -> None:
        self.address = address
        self.options = (options or ClientOptions()).override(
            timeout=timeout,
            retries=retries,
            backoff_s=backoff_s,
            max_message_bytes=max_message_bytes,
            root_cert=root_cert,
        )
        self._metadata = bearer_metadata(token)
        self._infos: dict[str, policy_pb2.PolicyInfo] = {}
        self._connect()

    def _connect(self) -> None:
        """Open the channel and the stub (each client its kind)."""
        raise NotImplementedError

    @property
    def timeout(self) -> float:
        """The per-attempt deadline in seconds."""
        return self.options.timeout_s

    def _cached_info(self, version: str | int) -> policy_pb2.PolicyInfo | None:
        return self._infos.get(str(version))

    def _remember(self, version: str | int, info: policy_pb2.PolicyInfo) -> policy_pb2.PolicyInfo:
        """Keep the info of a version number (never of "" or an alias, which move)."""
        if is_pinned(version):
            self._infos[str(version)] = info
        return info
