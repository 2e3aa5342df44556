"""The tunnel: many unary calls carried over one long-lived stream, balancer → replica.

A unary call through gRPC costs an HTTP/2 stream, headers and a write (a syscall) of its own
on each side. The balancer instead opens one bidirectional stream per replica
(``TUNNEL_METHOD``) and sends every unary call on it as a *frame*: many frames share one
message, so one write carries every call that became ready in the same turn of the event loop.
This module holds the wire format (both ends) and the replica's end, ``TunnelServer`` (the
socket that may carry the frames instead is ``hashmesh.core.tunnel_socket``), which runs each
frame through the same interceptors and method handlers a direct call reaches, with a context
that gives the handler what grpc.aio's would: metadata, the deadline, abort with status,
details and trailing metadata, initial metadata, the caller's peer. A call's deadline
travels in its frame and is enforced here; a ``CANCEL`` frame cancels the handler.

Wire format, little-endian. A message is a sequence of frames.
- call:   ``u32 id, u8 kind (0 call, 1 cancel), f64 timeout (<0: none), u16 method length,
  u16 metadata count, u32 payload length``, the method (UTF-8), the metadata, the payload.
- reply:  ``u32 id, u16 status code, u32 details length, u16 initial count, u16 trailing
  count, u32 payload length``, the details (UTF-8), initial metadata, trailing, the payload.
- metadata entry: ``u16 key length, u32 value length``, key, value (bytes for ``-bin`` keys,
  else ASCII text)."""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from hashmesh.core.handlers import Context, Handler

if TYPE_CHECKING:
    from hashmesh.core.tunnel_socket import SocketListener

log = logging.getLogger(__name__)

TUNNEL_METHOD = "/hashmesh.internal.v1.Tunnel/Unary"
ADVERTISE = "hashmesh-tunnel-socket"
"""Initial metadata of the tunnel stream: ``<port> <token in hex>`` of the replica's socket
(``hashmesh.core.tunnel_socket``)."""
INTERNAL_PREFIX = "/hashmesh.internal."
CALL, CANCEL = 0, 1
MAX_CALLS_PER_TUNNEL = 4096
"""Calls one tunnel may have running on a replica; more are refused with RESOURCE_EXHAUSTED."""
MAX_PAYLOAD = 256 * 1024
"""Larger requests go as calls of their own (they are not bound by the cost per call)."""
MAX_TIMEOUT = 1e8
"""Seconds; a longer timeout in a frame means no deadline (about three years)."""
BATCH_BYTES = 1024 * 1024
"""Frames are packed into messages of about this size at most."""

_CALL = struct.Struct("<IBdHHI")
_REPLY = struct.Struct("<IHIHHI")
_ENTRY = struct.Struct("<HI")
_CODES = {code.value[0]: code for code in grpc.StatusCode}

Metadata = tuple[tuple[str, str | bytes], ...]


class MalformedFrame(ValueError):
    """Bytes that are not a frame of this format."""


def _pack_metadata(parts: list[bytes], metadata: Sequence[tuple[str, str | bytes]]) -> None:
    for key, value in metadata:
        raw_key = key.encode()
        raw = value if isinstance(value, bytes) else value.encode()
        parts.append(_ENTRY.pack(len(raw_key), len(raw)))
        parts.append(raw_key)
        parts.append(raw)


def _unpack_metadata(data: bytes, offset: int, count: int) -> tuple[Metadata, int]:
    entries = []
    size = _ENTRY.size
    for _ in range(count):
        key_length, value_length = _ENTRY.unpack_from(data, offset)
        offset += size
        key = data[offset : offset + key_length].decode()
        offset += key_length
        raw = data[offset : offset + value_length]
        offset += value_length
        entries.append((key, raw if key.endswith("-bin") else raw.decode()))
    return tuple(entries), offset


def encode_call(
    call_id: int,
    method: str,
    metadata: Sequence[tuple[str, str | bytes]],
    timeout: float | None,
    payload: bytes,
) -> bytes:
    raw_method = method.encode()
    # A deadline already passed is 0 (expired), never negative (which would mean none).
    parts = [
        _CALL.pack(
            call_id,
            CALL,
            -1.0 if timeout is None else max(timeout, 0.0),
            len(raw_method),
            len(metadata),
            len(payload),
        ),
        raw_method,
    ]
    _pack_metadata(parts, metadata)
    parts.append(payload)
    return b"".join(parts)


def encode_cancel(call_id: int) -> bytes:
    return _CALL.pack(call_id, CANCEL, -1.0, 0, 0, 0)


class CallFrame:
    __slots__ = ("call_id", "kind", "metadata", "method", "payload", "timeout")

    def __init__(
        self,
        call_id: int,
        kind: int,
        timeout: float | None,
        method: str,
        metadata: Metadata,
        payload: bytes,
    ) -> None:
        self.call_id = call_id
        self.kind = kind
        self.timeout = timeout
        self.method = method
        self.metadata = metadata
        self.payload = payload


def decode_calls(data: bytes) -> Iterator[CallFrame]:
    offset, end = 0, len(data)
    try:
        while offset < end:
            call_id, kind, timeout, method_length, count, payload_length = _CALL.unpack_from(
                data, offset
            )
            offset += _CALL.size
            method = data[offset : offset + method_length].decode()
            offset += method_length
            metadata, offset = _unpack_metadata(data, offset, count)
            payload = data[offset : offset + payload_length]
            offset += payload_length
            if offset > end or kind not in (CALL, CANCEL):
                raise MalformedFrame("truncated or unknown tunnel frame")
            # Negative means none; so do NaN and absurd values (timers cannot hold them).
            usable = 0 <= timeout <= MAX_TIMEOUT
            yield CallFrame(call_id, kind, timeout if usable else None, method, metadata, payload)
    except (struct.error, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"malformed tunnel frame: {exc}") from exc


class Reply:
    """How one call ended, as the replica's handler left it."""

    __slots__ = ("call_id", "code", "details", "initial", "payload", "trailing")

    def __init__(
        self,
        call_id: int,
        code: grpc.StatusCode,
        details: str,
        initial: Metadata,
        trailing: Metadata,
        payload: bytes,
    ) -> None:
        self.call_id = call_id
        self.code = code
        self.details = details
        self.initial = initial
        self.trailing = trailing
        self.payload = payload


def encode_reply(reply: Reply) -> bytes:
    raw_details = reply.details.encode()
    parts = [
        _REPLY.pack(
            reply.call_id,
            reply.code.value[0],
            len(raw_details),
            len(reply.initial),
            len(reply.trailing),
            len(reply.payload),
        ),
        raw_details,
    ]
    _pack_metadata(parts, reply.initial)
    _pack_metadata(parts, reply.trailing)
    parts.append(reply.payload)
    return b"".join(parts)


def decode_replies(data: bytes) -> Iterator[Reply]:
    offset, end = 0, len(data)
    try:
        while offset < end:
            call_id, code, details_length, initial_count, trailing_count, payload_length = (
                _REPLY.unpack_from(data, offset)
            )
            offset += _REPLY.size
            details = data[offset : offset + details_length].decode()
            offset += details_length
            initial, offset = _unpack_metadata(data, offset, initial_count)
            trailing, offset = _unpack_metadata(data, offset, trailing_count)
            payload = data[offset : offset + payload_length]
            offset += payload_length
            if offset > end:
                raise MalformedFrame("truncated tunnel reply")
            yield Reply(
                call_id,
                _CODES.get(code, grpc.StatusCode.UNKNOWN),
                details,
                initial,
                trailing,
                payload,
            )
    except (struct.error, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"malformed tunnel reply: {exc}") from exc


# -- the replica's end ---------------------------------------------------------------------------


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: Metadata) -> None:
        self.method = method
        self.invocation_metadata = metadata


class TunnelContext:
    """What a unary handler sees of its call when it came through the tunnel: the subset of
    ``Context`` a unary handler uses, with the stream's peer and auth."""

    def __init__(self, stream: Context, metadata: Metadata, timeout: float | None) -> None:
        self._stream = stream
        self._metadata = metadata
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._initial: Metadata = ()
        self._trailing: Metadata = ()
        self._cancelled = False

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def peer(self) -> str:
        return str(self._stream.peer())

    def peer_identities(self) -> Any:
        return self._stream.peer_identities()

    def peer_identity_key(self) -> Any:
        return self._stream.peer_identity_key()

    def auth_context(self) -> Any:
        return self._stream.auth_context()

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._initial = tuple(metadata)

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self) -> str:
        return self._details

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        if code is grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN  # as grpc.aio does: abort never means success
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._code is not None or self._cancelled

    def set_compression(self, compression: Any) -> None:
        """Compression is the tunnel's, not the call's: nothing to do."""

    def disable_next_message_compression(self) -> None:
        """Compression is the tunnel's, not the call's: nothing to do."""

    def reply(self, call_id: int, payload: bytes) -> Reply:
        code = self._code or grpc.StatusCode.OK
        return Reply(
            call_id,
            code,
            self._details,
            self._initial,
            self._trailing,
            payload if code is grpc.StatusCode.OK else b"",
        )


class _Recorder:
    """Stands in for the server when a generated ``add_*_to_server`` registers handlers."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self._handlers = handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        for name, handler in handlers.items():
            self._handlers[f"/{service}/{name}"] = handler

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        for generic in handlers:
            service = getattr(generic, "service_name", None)
            methods = getattr(generic, "_method_handlers", None)
            if callable(service) and isinstance(methods, dict):
                self.add_registered_method_handlers(service(), methods)


class TunnelServer(grpc.GenericRpcHandler):
    """The replica's end: answers ``TUNNEL_METHOD`` by running each frame's unary method
    through ``interceptors`` (outermost first) and the handler ``record`` saw registered."""

    def __init__(
        self, interceptors: Sequence[grpc.aio.ServerInterceptor], max_message_bytes: int
    ) -> None:
        self._interceptors = tuple(interceptors)
        self.max_reply_bytes = max_message_bytes
        self._handlers: dict[str, Handler] = {}
        self._stream_handler: Handler = grpc.stream_stream_rpc_method_handler(self._serve)
        self.socket: SocketListener | None = None
        """Set (and started) by the server when its listener is plaintext."""

    def record(self, register: Callable[[Any, Any], None], servicer: Any) -> None:
        register(servicer, _Recorder(self._handlers))

    def service(self, details: grpc.HandlerCallDetails) -> Handler | None:
        return self._stream_handler if details.method == TUNNEL_METHOD else None

    async def _resolve(self, method: str, metadata: Metadata) -> Handler | None:
        interceptors = self._interceptors
        handlers = self._handlers

        async def continue_at(index: int, details: grpc.HandlerCallDetails) -> Handler | None:
            if index == len(interceptors):
                return handlers.get(details.method)
            return await interceptors[index].intercept_service(
                functools.partial(continue_at, index + 1), details
            )

        if handlers.get(method) is None:
            return None
        return await continue_at(0, _Details(method, metadata))

    async def _serve(self, requests: Any, context: Context) -> None:
        session = Session(self, context)
        # A socket for the calls, bound to this stream (``hashmesh.core.tunnel_socket``).
        grant = self.socket.grant(session) if self.socket is not None else None
        if grant is not None:
            await context.send_initial_metadata(((ADVERTISE, grant.value),))
        reader = asyncio.get_running_loop().create_task(session.read(requests))
        try:
            await session.write_until_done(reader)
        finally:
            if grant is not None:
                grant.revoke()
            reader.cancel()
            session.cancel_all()
            await asyncio.gather(reader, return_exceptions=True)
        if session.error is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, session.error)

    async def run(self, frame: CallFrame, stream: Context) -> Reply:
        """One call, to its end: the status its handler (or interceptors) left."""
        context = TunnelContext(stream, frame.metadata, frame.timeout)
        try:
            handler = await self._resolve(frame.method, frame.metadata)
            if handler is None or handler.unary_unary is None:
                return Reply(
                    frame.call_id, grpc.StatusCode.UNIMPLEMENTED, "Method not found!", (), (), b""
                )
            deserialize = handler.request_deserializer
            request = deserialize(frame.payload) if deserialize is not None else frame.payload
            async with asyncio.timeout(frame.timeout):
                # A TunnelContext stands in for the call's context (what unary handlers use).
                response = await handler.unary_unary(request, context)  # type: ignore[arg-type]
            serialize = handler.response_serializer
            payload = serialize(response) if serialize is not None else response
            return context.reply(frame.call_id, payload)
        except grpc.aio.AbortError:
            return context.reply(frame.call_id, b"")
        except TimeoutError:
            return Reply(
                frame.call_id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", (), (), b""
            )
        except Exception:
            log.exception("tunnelled call failed", extra={"method": frame.method})
            return Reply(
                frame.call_id,
                grpc.StatusCode.UNKNOWN,
                "Unexpected error in the tunnelled call",
                (),
                (),
                b"",
            )


class Calls:
    """The calls in flight on one tunnel (either carrier): frames in, replies out through
    ``send`` (which queues one encoded reply)."""

    def __init__(
        self,
        server: TunnelServer,
        context: Context,
        send: Callable[[bytes], None],
        on_idle: Callable[[], None],
    ) -> None:
        self._server = server
        self._context = context
        self._send = send
        self._on_idle = on_idle
        self._running: dict[int, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._running)

    def take(self, message: bytes) -> None:
        """Start (or cancel) the calls of one message; ``MalformedFrame`` for bad bytes."""
        loop = asyncio.get_running_loop()
        running = self._running
        for frame in decode_calls(message):
            if frame.kind == CANCEL:
                task = running.get(frame.call_id)
                if task is not None:
                    task.cancel()
            elif frame.call_id in running:  # one task per id: the cap below holds
                self._refuse(
                    frame.call_id,
                    grpc.StatusCode.ALREADY_EXISTS,
                    "a call with this id is still running on this tunnel",
                )
            elif len(running) >= MAX_CALLS_PER_TUNNEL:
                self._refuse(
                    frame.call_id,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {MAX_CALLS_PER_TUNNEL} calls in flight on one tunnel",
                )
            else:
                running[frame.call_id] = loop.create_task(self._call(frame))

    def _refuse(self, call_id: int, code: grpc.StatusCode, details: str) -> None:
        self._send(encode_reply(Reply(call_id, code, details, (), (), b"")))

    async def _call(self, frame: CallFrame) -> None:
        try:
            reply = await self._server.run(frame, self._context)
            encoded = encode_reply(reply)
            if len(encoded) > self._server.max_reply_bytes:  # would break the whole tunnel
                encoded = encode_reply(
                    Reply(
                        frame.call_id,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "response larger than the message size limit",
                        (),
                        (),
                        b"",
                    )
                )
            self._send(encoded)
        except asyncio.CancelledError:
            pass  # the balancer gave up on it: no one waits for a reply
        finally:
            self._running.pop(frame.call_id, None)
            if not self._running:
                self._on_idle()

    def cancel_all(self) -> None:
        for task in self._running.values():
            task.cancel()


class Session:
    """One tunnel stream on the replica: its calls in flight and the replies to write."""

    def __init__(self, server: TunnelServer, context: Context) -> None:
        self._context = context
        self._outbox: list[bytes] = []
        self._wake = asyncio.Event()
        self.calls = Calls(server, context, self._send, self._wake.set)
        self._socket_send: Callable[[bytes], None] | None = None
        self.error: str | None = None

    async def read(self, requests: Any) -> None:
        try:
            async for message in requests:
                self.calls.take(message)
        except MalformedFrame as exc:
            self.error = str(exc)
        finally:
            self._wake.set()

    def _send(self, encoded: bytes) -> None:
        if self._socket_send is not None:
            self._socket_send(encoded)
            return
        self._outbox.append(encoded)
        self._wake.set()

    def attach(self, send: Callable[[bytes], None]) -> None:
        """Replies go out through the session's socket from now on."""
        self._socket_send = send

    def detach(self) -> None:
        self._socket_send = None

    async def write_until_done(self, reader: asyncio.Task[None]) -> None:
        """Write replies in batches until the balancer stopped sending and every call ended."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                await self._context.write(take_batch(self._outbox))
            if self.error is not None or (
                reader.done() and not len(self.calls) and not self._outbox
            ):
                return

    def cancel_all(self) -> None:
        self.calls.cancel_all()


def batch_length(frames: Sequence[bytes], limit: int = BATCH_BYTES) -> int:
    """How many frames from the head of ``frames`` make one batch: up to ``limit`` bytes, at
    least one (a frame larger than ``limit`` goes alone)."""
    size = 0
    count = 0
    for frame in frames:
        if count and size + len(frame) > limit:
            break
        size += len(frame)
        count += 1
    return count


def take_batch(outbox: list[bytes]) -> bytes:
    """Frames from the head of ``outbox`` up to ``BATCH_BYTES`` (at least one), removed."""
    count = batch_length(outbox)
    batch = b"".join(outbox[:count])
    del outbox[:count]
    return batch
