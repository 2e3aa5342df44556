"""The balancer's end of the tunnel (``hashmesh.core.tunnel``): one long-lived stream per
replica channel carrying every small unary call, and the plain socket the replica may offer
on it (``hashmesh.core.tunnel_socket``), which then carries the calls instead.

``Tunnel.unary`` sends one call and waits for its ``Reply``. Frames that become ready in the
same turn of the event loop share one message (one write, one syscall, for all of them). A
call whose caller goes away (client cancelled, deadline passed) sends a ``CANCEL`` frame, so
the replica's handler is cancelled as a direct call's would be. When the stream or its socket
ends, every call still waiting gets the tunnel's status: ``UNAVAILABLE`` with its details;
calls whose frame was never written say so ("before the call was sent"), which makes them
safe to retry on another replica whatever the method. A replica without the tunnel (an older
hashd) answers ``UNIMPLEMENTED`` for the stream: the tunnel marks itself ``unsupported`` and
the proxy sends that replica calls of their own for the next ``RETRY_UNSUPPORTED`` seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

import grpc

from hashmesh.core.tunnel import (
    ADVERTISE,
    BATCH_BYTES,
    MAX_PAYLOAD,
    TUNNEL_METHOD,
    MalformedFrame,
    Reply,
    batch_length,
    decode_replies,
    encode_call,
    encode_cancel,
)
from hashmesh.core.tunnel_socket import HANDSHAKE_SECONDS, MessageReader, pack, parse_advert

log = logging.getLogger(__name__)

NOT_SENT = "the tunnel closed before the call was sent"
LOST = "the tunnel closed while the call was in it"
RETRY_UNSUPPORTED = 60.0
"""Seconds a replica without the tunnel gets calls of their own before it is asked again."""


class Tunnel:
    """The tunnel over one replica channel; opened on first use, reopened after it ends."""

    def __init__(self, channel: grpc.aio.Channel, max_message_bytes: int, host: str = "") -> None:
        self.channel = channel
        self._host = host
        self._max_message_bytes = max_message_bytes
        self._socket: _Socket | None = None
        self._unsupported_until = 0.0
        self.max_payload = min(MAX_PAYLOAD, max_message_bytes // 4)
        self._batch_bytes = min(BATCH_BYTES, max_message_bytes // 2)
        self._stream: Any = None
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._outbox: list[bytes] = []
        self._outbox_ids: list[int] = []
        self._wake = asyncio.Event()
        self._next_id = 0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def unsupported(self) -> bool:
        """The replica answered UNIMPLEMENTED to the tunnel less than ``RETRY_UNSUPPORTED``
        seconds ago (asked again after that: it may have been upgraded)."""
        until = self._unsupported_until
        return until != 0.0 and until > time.monotonic()  # no clock read on the hot path

    def _open(self) -> None:
        # _registered_method is private (tests/unit/test_private_apis.py), so not in the stubs.
        open_stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes]
        open_stream = self.channel.stream_stream(TUNNEL_METHOD, _registered_method=True)  # type: ignore[call-arg]
        stream = self._stream = open_stream()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write(stream), name="tunnel-write"),
            loop.create_task(self._read(stream), name="tunnel-read"),
        ]

    async def unary(
        self,
        method: str,
        metadata: Sequence[tuple[str, str | bytes]],
        timeout: float | None,
        payload: bytes,
    ) -> Reply:
        if self._stream is None:
            self._open()
        call_id = self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        self._queue(call_id, encode_call(call_id, method, metadata, timeout, payload))
        try:
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and self._stream is not None:
                self._queue(-1, encode_cancel(call_id))
            raise

    def _queue(self, call_id: int, frame: bytes) -> None:
        """On the socket when it is up (the replica's session takes frames from either
        carrier), else on the stream."""
        socket = self._socket
        if socket is not None:
            socket.send(call_id, frame)
            return
        self._outbox.append(frame)
        self._outbox_ids.append(call_id)
        self._wake.set()

    def resolve(self, message: bytes) -> None:
        """The replies of one message, from either carrier, to the calls waiting for them."""
        pending = self._pending
        for reply in decode_replies(message):
            future = pending.pop(reply.call_id, None)
            if future is not None and not future.done():
                future.set_result(reply)

    async def _connect(self, stream: Any, port: int, token: bytes) -> None:
        """The socket the replica offered; without it the stream keeps carrying the calls."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                _, socket = await loop.create_connection(
                    lambda: _Socket(self, stream, self._max_message_bytes), self._host, port
                )
        except (OSError, TimeoutError) as exc:
            log.info(
                "tunnel socket unreachable; the stream carries the calls", extra={"error": str(exc)}
            )
            return
        socket.handshake(token)
        try:
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                accepted = await socket.accepted
        except TimeoutError:
            accepted = False
        if not accepted or stream is not self._stream:  # refused, or the stream ended meanwhile
            log.info("tunnel socket refused; the stream carries the calls")
            socket.close()
            return
        self._socket = socket

    async def _write(self, stream: Any) -> None:
        outbox, ids = self._outbox, self._outbox_ids
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while outbox:
                    count = batch_length(outbox, self._batch_bytes)
                    batch = b"".join(outbox[:count])
                    del outbox[:count], ids[:count]
                    await stream.write(batch)
        except Exception as exc:  # the stream ended: _read says how
            log.debug("tunnel write stopped", extra={"error": str(exc)})

    async def _read(self, stream: Any) -> None:
        code, details = grpc.StatusCode.UNAVAILABLE, "the tunnel to the replica ended"
        try:
            for key, value in await stream.initial_metadata() or ():
                offer = parse_advert(value) if key == ADVERTISE and self._host else None
                if offer is not None:
                    connect = self._connect(stream, *offer)
                    self._tasks.append(asyncio.get_running_loop().create_task(connect))
            while True:
                message = await stream.read()
                if message is grpc.aio.EOF:
                    break
                self.resolve(message)
            code, details = (
                grpc.StatusCode.UNAVAILABLE,
                "the tunnel to the replica ended (connection closed)",
            )
        except grpc.aio.AioRpcError as err:
            code, details = err.code(), err.details() or ""
            if code is grpc.StatusCode.UNIMPLEMENTED:
                self._unsupported_until = time.monotonic() + RETRY_UNSUPPORTED
        except MalformedFrame as exc:
            log.error("replica sent a malformed tunnel reply", extra={"error": str(exc)})
            details = f"the replica's tunnel reply was malformed: {exc}"
        finally:
            self._close(stream, code, details)

    def _close(self, stream: Any, code: grpc.StatusCode, details: str) -> None:
        """Fail every call still waiting on ``stream``; the next call opens a new stream."""
        if stream is None or stream is not self._stream:
            return  # an older stream, already closed
        self._stream = None
        socket, self._socket = self._socket, None
        # A call is lost in the tunnel once its frame left our outboxes, else never sent.
        unsent = set(self._outbox_ids)
        if socket is not None:
            unsent.update(socket.unsent())
            socket.close()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        stream.cancel()
        pending, self._pending = self._pending, {}
        self._outbox.clear()
        self._outbox_ids.clear()
        if code is not grpc.StatusCode.UNAVAILABLE:
            # The stream's status is the tunnel's, never a call's (a call's comes in its reply).
            details = f"the tunnel to the replica ended with {code.name}: {details}"
            code = grpc.StatusCode.UNAVAILABLE
        for call_id, future in pending.items():
            if not future.done():
                text = f"{NOT_SENT if call_id in unsent else LOST}: {details}"
                future.set_result(Reply(call_id, code, text, (), (), b""))
        if pending:
            log.warning(
                "tunnel to a replica closed",
                extra={"calls_failed": len(pending), "reason": details},
            )

    def close(self) -> None:
        self._close(self._stream, grpc.StatusCode.UNAVAILABLE, "the balancer is stopping")


class _Socket(asyncio.Protocol):
    """The balancer's end of a tunnel socket: frames of one loop turn go in one write; its
    end ends the tunnel (the calls in it fail as when the stream ends)."""

    def __init__(self, tunnel: Tunnel, stream: Any, max_message_bytes: int) -> None:
        self._tunnel = tunnel
        self._stream = stream
        # A replica packs replies up to BATCH_BYTES, plus one reply up to its own limit.
        self._reader = MessageReader(BATCH_BYTES + max_message_bytes)
        self._batch_bytes = min(BATCH_BYTES, max_message_bytes // 2)
        self._transport: asyncio.Transport | None = None
        self.accepted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._frames: list[bytes] = []
        self._ids: list[int] = []
        self._flushing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, call_id: int, frame: bytes) -> None:
        self._frames.append(frame)
        self._ids.append(call_id)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        transport = self._transport
        if transport is None:
            return
        frames, ids = self._frames, self._ids
        while frames:
            count = batch_length(frames, self._batch_bytes)
            transport.write(pack(b"".join(frames[:count])))  # one frame: joined without a copy
            del frames[:count], ids[:count]

    def handshake(self, token: bytes) -> None:
        """The token, a message of its own, before any frame."""
        if self._transport is not None:
            self._transport.write(pack(token))

    def unsent(self) -> list[int]:
        return self._ids

    def data_received(self, data: bytes) -> None:
        try:
            for message in self._reader.feed(data):
                if not message and not self.accepted.done():
                    self.accepted.set_result(True)
                    continue
                self._tunnel.resolve(message)
        except MalformedFrame as exc:
            log.error("replica sent a malformed tunnel reply", extra={"error": str(exc)})
            self._end(f"the replica's tunnel reply was malformed: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.accepted.done():
            self.accepted.set_result(False)  # never carried a call: the stream goes on
            return
        self._end("the tunnel's socket to the replica closed")

    def _end(self, details: str) -> None:
        self._tunnel._close(self._stream, grpc.StatusCode.UNAVAILABLE, details)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Tunnels:
    """One ``Tunnel`` per replica channel, made on first use (bounded by the replicas known)."""

    def __init__(self, max_message_bytes: int, *, sockets: bool = True) -> None:
        self._max_message_bytes = max_message_bytes
        # Never a plaintext socket beside a TLS channel (a TLS replica offers none anyway).
        self._sockets = sockets
        self._by_address: dict[str, Tunnel] = {}

    def of(self, address: str, channel: grpc.aio.Channel, known: int) -> Tunnel:
        tunnel = self._by_address.get(address)
        if tunnel is None or tunnel.channel is not channel:
            if tunnel is not None:
                tunnel.close()
            if len(self._by_address) > 2 * known + 8:  # replicas DNS no longer lists
                self.close()
            host = address.rsplit(":", 1)[0].strip("[]") if self._sockets else ""
            tunnel = self._by_address[address] = Tunnel(channel, self._max_message_bytes, host)
        return tunnel

    def close(self) -> None:
        for tunnel in self._by_address.values():
            tunnel.close()
        self._by_address.clear()
