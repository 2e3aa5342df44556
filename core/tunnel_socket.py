"""The tunnel's second carrier: the same frames (``hashmesh.core.tunnel``) over a plain TCP
socket, without grpc in between.

Every operation on a gRPC stream (one write, one read) is a batch in grpc's core whose
completion crosses grpc's poller thread back to the event loop; on a socket a write is one
``send`` from the loop thread and replies arrive in the loop's own ``recv``. The gRPC stream
stays the control channel: it reaches the balancer through the replica's own listener and
its connection limits, and when it opens, a replica with a socket listener advertises it in
the stream's initial metadata (``ADVERTISE``: port and a one-time token). The balancer
connects, sends the token as its first message, the replica accepts it with an empty message,
and the socket then carries the calls, bound to that stream: calls run with the stream's peer
and credentials, and the socket is closed when the stream ends. A replica whose gRPC listener has TLS advertises no socket (the stream carries
the calls, encrypted); a balancer that cannot reach the port keeps using the stream.

Messages on the socket are ``u32 length`` (little-endian) and that many bytes of frames."""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
from typing import cast

from hashmesh.core.tunnel import Calls, MalformedFrame, Session, TunnelServer, take_batch

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
HANDSHAKE_SECONDS = 5.0
"""A connection that has not shown a valid token by then is closed."""
MAX_HANDSHAKES = 64
"""Connections still to show their token; more are closed at once."""
_LENGTH = struct.Struct("<I")


def pack(message: bytes) -> bytes:
    return _LENGTH.pack(len(message)) + message


class MessageReader:
    """Cuts a byte stream into messages; a message longer than ``max_bytes`` is refused."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        messages = []
        offset = 0
        available = len(buffer)
        while available - offset >= 4:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length > self._max:
                raise MalformedFrame(f"a tunnel message of {length} bytes is over the limit")
            if available - offset - 4 < length:
                break
            messages.append(bytes(buffer[offset + 4 : offset + 4 + length]))
            offset += 4 + length
        if offset:
            del buffer[:offset]
        return messages


class Grant:
    """One token handed out on a tunnel stream; the socket that shows it joins that stream's
    session (the same calls: a cancel or a reply may take either carrier)."""

    def __init__(self, listener: SocketListener, session: Session) -> None:
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.session = session
        self.value = f"{listener.port} {self.token.hex()}"
        self.connection: _Connection | None = None
        self._listener = listener

    def revoke(self) -> None:
        """The stream ended: the token is void and its socket closed."""
        self._listener.grants.pop(self.token, None)
        if self.connection is not None:
            self.connection.close()


class SocketListener:
    """The replica's socket end: one listener next to the gRPC one, on the same host."""

    def __init__(self, tunnel: TunnelServer, max_message_bytes: int) -> None:
        self.tunnel = tunnel
        self.max_message_bytes = max_message_bytes
        self.grants: dict[bytes, Grant] = {}
        self.handshaking = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str) -> None:
        """Listen on ``host`` (the gRPC listener's), any free port; a host that is not an IP
        or a name (a unix socket) leaves the tunnel on its stream."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Connection(self), host or None, 0, reuse_address=True
            )
        except OSError as exc:
            log.warning("no tunnel socket", extra={"host": host, "error": str(exc)})
            return
        self.port = self._server.sockets[0].getsockname()[1]

    def grant(self, session: Session) -> Grant | None:
        if not self.port:
            return None
        grant = Grant(self, session)
        self.grants[grant.token] = grant
        return grant

    async def close(self) -> None:
        for grant in list(self.grants.values()):
            grant.revoke()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class _Connection(asyncio.Protocol):
    """One balancer's socket: the token first, then messages of frames both ways."""

    def __init__(self, listener: SocketListener) -> None:
        self._listener = listener
        self._reader = MessageReader(listener.max_message_bytes)
        self._transport: asyncio.Transport | None = None
        self._calls: Calls | None = None
        self._session: Session | None = None
        self._outbox: list[bytes] = []
        self._flushing = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = self._transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        listener = self._listener
        if listener.handshaking >= MAX_HANDSHAKES:
            stream.abort()
            return
        listener.handshaking += 1
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_SECONDS, stream.abort)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
            for message in messages:
                if self._calls is None:
                    self._handshake(message)
                else:
                    self._calls.take(message)
        except MalformedFrame as exc:
            log.warning("tunnel socket closed: malformed input", extra={"error": str(exc)})
            self.close()

    def _handshake(self, token: bytes) -> None:
        grant = self._listener.grants.pop(token, None)
        if grant is None:
            raise MalformedFrame("the tunnel socket's first message is not a valid token")
        self._end_handshake()
        grant.connection = self
        self._session = grant.session
        self._calls = grant.session.calls
        grant.session.attach(self.send)
        if self._transport is not None:
            self._transport.write(pack(b""))  # accepted: the balancer sends calls from now on

    def _end_handshake(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._listener.handshaking -= 1

    def send(self, encoded: bytes) -> None:
        self._outbox.append(encoded)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Every reply that became ready in this turn of the loop, in one write."""
        self._flushing = False
        transport = self._transport
        outbox = self._outbox
        if transport is None or transport.is_closing():
            outbox.clear()  # the balancer saw it close: it fails these calls itself
            return
        while outbox:
            transport.write(pack(take_batch(outbox)))

    def pause_writing(self) -> None:
        # The balancer does not read its replies: stop taking new calls from it meanwhile.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_handshake()
        self._transport = None
        if self._session is not None:  # replies go back on the stream (the balancer, which
            self._session.detach()  # saw the socket close, ends the stream too)


def parse_advert(value: str | bytes) -> tuple[int, bytes] | None:
    """``(port, token)`` from an ``ADVERTISE`` value, ``None`` if it is not one."""
    if isinstance(value, bytes):
        return None
    port, _, token = value.partition(" ")
    try:
        number, raw = int(port), bytes.fromhex(token)
    except ValueError:
        return None
    if not 0 < number < 65536 or len(raw) != TOKEN_BYTES:
        return None
    return number, raw
