"""Channels to a policy server from an address and `ClientOptions` (sync or asyncio), and call metadata."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

from wmpo.robot.errors import PolicyClientError
from wmpo.robot.options import ClientOptions

Metadata = tuple[tuple[str, str], ...]


def parse_address(address: str) -> tuple[str, bool]:
    """``grpc://host:port`` -> (host:port, TLS off); ``grpcs://`` -> TLS on; bare ``host:port`` -> off."""
    tls = address.startswith("grpcs://")
    if tls or address.startswith("grpc://"):
        address = address.split("://", 1)[1]
    elif "://" in address:
        raise ValueError(f"unsupported address {address!r}: use grpc://host:port or grpcs://host:port")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} must look like host:port")
    return address, tls


def _target(address: str, options: ClientOptions) -> tuple[str, grpc.ChannelCredentials | None, list[tuple[str, int]]]:
    """(host:port, TLS credentials or None for plaintext, channel arguments)."""
    target, tls = parse_address(address)
    if options.root_cert is not None and not tls:
        raise ValueError(f"a root certificate was given for the plaintext address {address!r}: use grpcs://")
    args = [
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.max_send_message_length", options.max_message_bytes),
    ]
    return target, grpc.ssl_channel_credentials(options.root_cert_bytes()) if tls else None, args


def open_channel(address: str, options: ClientOptions) -> grpc.Channel:
    """A blocking channel to `address`."""
    target, credentials, args = _target(address, options)
    if credentials is None:
        return grpc.insecure_channel(target, options=args)
    return grpc.secure_channel(target, credentials, options=args)


def open_aio_channel(address: str, options: ClientOptions) -> grpc.aio.Channel:
    """An asyncio channel to `address`."""
    target, credentials, args = _target(address, options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=args)
    return grpc.aio.secure_channel(target, credentials, options=args)


def bearer_metadata(token: str | None) -> Metadata:
    """``authorization: Bearer <token>`` (nothing without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def check_size(request: Message, options: ClientOptions) -> None:
    """Refuse a request over the message limit before sending it (gRPC's RESOURCE_EXHAUSTED is retried)."""
    size = request.ByteSize()
    if size > options.max_message_bytes:
        raise PolicyClientError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the request is {size} bytes, over the {options.max_message_bytes}-byte message limit",
        )
