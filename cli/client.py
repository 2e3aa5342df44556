"""Channels, stubs and metadata for hashctl, and the translation of gRPC failures into one
line on stderr with a distinct exit code per kind of failure."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeAlias, cast

import grpc
from grpc_status import rpc_status

from hashmesh.cli.options import CliOptions
from hashmesh.core.settings import SettingsError
from hashmesh.core.tls import ClientTls
from hashmesh.v1 import (
    admin_pb2_grpc,
    cache_pb2_grpc,
    hash_pb2_grpc,
    task_pb2_grpc,
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ExitCode(IntEnum):
    """hashctl's exit codes; scripts may rely on them."""

    OK = 0
    OTHER = 1
    USAGE = 2
    UNAVAILABLE = 3
    INVALID_ARGUMENT = 4
    NOT_FOUND = 5
    RATE_LIMITED = 6
    DEADLINE_EXCEEDED = 7
    DENIED = 8
    FAILED_PRECONDITION = 9
    MISMATCH = 10


_EXIT_BY_STATUS: dict[grpc.StatusCode, ExitCode] = {
    grpc.StatusCode.UNAVAILABLE: ExitCode.UNAVAILABLE,
    grpc.StatusCode.INVALID_ARGUMENT: ExitCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE: ExitCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: ExitCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ExitCode.RATE_LIMITED,
    grpc.StatusCode.DEADLINE_EXCEEDED: ExitCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED: ExitCode.DENIED,
    grpc.StatusCode.PERMISSION_DENIED: ExitCode.DENIED,
    grpc.StatusCode.FAILED_PRECONDITION: ExitCode.FAILED_PRECONDITION,
}


CallMetadata: TypeAlias = tuple[tuple[str, str | bytes], ...]
"""Metadata a call sends, in the form grpc's calls take it."""


class CliError(Exception):
    """An expected failure: printed as one line on stderr, then exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.OTHER) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def retry_after_of(err: grpc.RpcError) -> float | None:
    """Seconds the server asked us to wait: google.rpc.RetryInfo, else ``retry-after``."""
    from google.rpc import error_details_pb2

    # A failed call's RpcError is its grpc.Call too, which is what from_call reads and what
    # types its trailers as (key, value) pairs (the stubs' RpcError has objects there).
    call = cast(grpc.Call, err)
    try:
        status = rpc_status.from_call(call)
    except (ValueError, AttributeError):
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return float(info.retry_delay.ToNanoseconds()) / 1e9
    trailing = call.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == "retry-after":
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None


def exit_code_of(code: grpc.StatusCode) -> ExitCode:
    """The exit code scripts see for a call that ended with ``code``."""
    return _EXIT_BY_STATUS.get(code, ExitCode.OTHER)


def error_from_rpc(err: grpc.RpcError, target: str) -> CliError:
    """The one-line message and exit code for a failed call to ``target``."""
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or ""
    message = f"{code.name}: {details}" if details else code.name
    if code is grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        message = f"UNAVAILABLE: cannot reach {target} ({details})"
        if any(word in details.lower() for word in ("ssl", "tls", "handshake", "certificate")):
            message += "; check --tls-ca / --tls-cert / --tls-key / --tls-server-name"
        else:
            message += (
                "; is a mesh running there? `hashctl up` starts one on this machine, "
                "--target (or HASHMESH_TARGET) points at another"
            )
    exit_code = exit_code_of(code)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        delay = retry_after_of(err)
        if delay is not None:
            message += f" (retry after {delay:.3g}s)"
        else:
            # Nothing to wait for (e.g. an input over the size limit): retrying cannot help.
            exit_code = ExitCode.INVALID_ARGUMENT
    return CliError(message, exit_code)


def channel_security(
    tls: ClientTls | None,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """Credentials (``None``: plaintext) and the channel options they need, for every channel
    hashctl opens (commands, bench, demo, locust): the one place transport security is decided.
    An unreadable certificate file is a usage error."""
    if tls is None:
        return None, []
    try:
        return tls.credentials(), tls.channel_options()
    except SettingsError as exc:
        raise CliError(f"TLS: {exc}", ExitCode.USAGE) from None


def sync_channel(
    target: str, tls: ClientTls | None, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A blocking channel to ``target``, TLS when ``tls`` is given."""
    credentials, extra = channel_security(tls)
    merged = [*(options or []), *extra]
    if credentials is None:
        return grpc.insecure_channel(target, options=merged)
    return grpc.secure_channel(target, credentials, options=merged)


def aio_channel(
    target: str, tls: ClientTls | None, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target``, TLS when ``tls`` is given."""
    credentials, extra = channel_security(tls)
    merged = [*(options or []), *extra]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=merged)
    return grpc.aio.secure_channel(target, credentials, options=merged)


def open_channel(target: str, options: CliOptions) -> grpc.Channel:
    """A channel to ``target`` for one command, with the invocation's TLS options."""
    channel_options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 0),
    ]
    return sync_channel(target, options.tls, channel_options)


@dataclass
class Session:
    """One invocation's connections: the public target and, lazily, the admin target."""

    options: CliOptions
    _channel: grpc.Channel | None = None
    _admin_channel: grpc.Channel | None = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = open_channel(self.options.target, self.options)
        return self._channel

    @property
    def admin_channel(self) -> grpc.Channel:
        if self._admin_channel is None:
            self._admin_channel = open_channel(self.options.admin_target, self.options)
        return self._admin_channel

    def metadata(self) -> CallMetadata:
        """Metadata of calls to the public endpoint: who we are, as far as we can say."""
        options = self.options
        sent: list[tuple[str, str | bytes]] = []
        if options.client_id:
            sent.append(("x-client-id", options.client_id))
        if options.api_key:
            sent.append(("x-api-key", options.api_key))
        return (*sent, *self.admin_metadata())

    def admin_metadata(self) -> CallMetadata:
        token = self.options.admin_token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def hash(self) -> hash_pb2_grpc.HashServiceStub:
        return hash_pb2_grpc.HashServiceStub(self.channel)

    def tasks(self) -> task_pb2_grpc.TaskServiceStub:
        return task_pb2_grpc.TaskServiceStub(self.channel)

    def cache(self) -> cache_pb2_grpc.CacheServiceStub:
        return cache_pb2_grpc.CacheServiceStub(self.channel)

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.admin_channel)

    def close(self) -> None:
        for channel in (self._channel, self._admin_channel):
            if channel is not None:
                channel.close()
        self._channel = self._admin_channel = None


@contextmanager
def rpc_errors(target: str) -> Iterator[None]:
    """Turn a failed call into ``CliError`` naming ``target``."""
    try:
        yield
    except grpc.RpcError as err:
        raise error_from_rpc(err, target) from None
