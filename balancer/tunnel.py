"""The balancer's end of the tunnel (``hashmesh.core.tunnel``): one long-lived stream per
replica channel carrying every small unary call, frames written in batches.

``Tunnel.unary`` sends one call and waits for its ``Reply``. Frames that become ready in the
same turn of the event loop share one message (one write, one syscall, for all of them). A
call whose caller goes away (client cancelled, deadline passed) sends a ``CANCEL`` frame, so
the replica's handler is cancelled as a direct call's would be. When the stream ends, every
call still waiting gets the stream's status: ``UNAVAILABLE`` with its details; calls whose
frame was never written say so ("before the call was sent"), which makes them safe to retry
on another replica whatever the method. A replica without the tunnel (an older hashd) answers
``UNIMPLEMENTED`` for the stream: the tunnel marks itself ``unsupported`` and the proxy sends
that replica calls of their own for the next ``RETRY_UNSUPPORTED`` seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc

from hashmesh.core.tunnel import (
    BATCH_BYTES,
    MAX_PAYLOAD,
    TUNNEL_METHOD,
    MalformedFrame,
    Reply,
    decode_replies,
    encode_call,
    encode_cancel,
)

log = logging.getLogger(__name__)

NOT_SENT = "the tunnel closed before the call was sent"
LOST = "the tunnel closed while the call was in it"
RETRY_UNSUPPORTED = 60.0
"""Seconds a replica without the tunnel gets calls of their own before it is asked again."""


class Tunnel:
    """The tunnel over one replica channel; opened on first use, reopened after it ends."""

    def __init__(self, channel: grpc.aio.Channel, max_message_bytes: int) -> None:
        self.channel = channel
        self._unsupported_until = 0.0
        self.max_payload = min(MAX_PAYLOAD, max_message_bytes // 4)
        self._batch_bytes = min(BATCH_BYTES, max_message_bytes // 2)
        self._stream: Any = None
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._outbox: list[bytes] = []
        self._outbox_ids: list[int] = []
        self._sent: set[int] = set()
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
        self._outbox.append(encode_call(call_id, method, metadata, timeout, payload))
        self._outbox_ids.append(call_id)
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and self._stream is not None:
                self._outbox.append(encode_cancel(call_id))
                self._outbox_ids.append(-1)
                self._wake.set()
            raise
        finally:
            self._sent.discard(call_id)

    async def _write(self, stream: Any) -> None:
        outbox, ids = self._outbox, self._outbox_ids
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while outbox:
                    size = count = 0
                    for frame in outbox:
                        if count and size + len(frame) > self._batch_bytes:
                            break
                        size += len(frame)
                        count += 1
                    batch = b"".join(outbox[:count])
                    self._sent.update(ids[:count])
                    del outbox[:count], ids[:count]
                    await stream.write(batch)
        except Exception as exc:  # the stream ended: _read says how
            log.debug("tunnel write stopped", extra={"error": str(exc)})

    async def _read(self, stream: Any) -> None:
        code, details = grpc.StatusCode.UNAVAILABLE, "the tunnel to the replica ended"
        try:
            async for message in stream:
                for reply in decode_replies(message):
                    future = self._pending.pop(reply.call_id, None)
                    if future is not None and not future.done():
                        future.set_result(reply)
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
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        stream.cancel()
        pending, self._pending = self._pending, {}
        sent, self._sent = self._sent, set()
        self._outbox.clear()
        self._outbox_ids.clear()
        if code is not grpc.StatusCode.UNAVAILABLE:
            # The stream's status is the tunnel's, never a call's (a call's comes in its reply).
            details = f"the tunnel to the replica ended with {code.name}: {details}"
            code = grpc.StatusCode.UNAVAILABLE
        for call_id, future in pending.items():
            if not future.done():
                text = f"{LOST if call_id in sent else NOT_SENT}: {details}"
                future.set_result(Reply(call_id, code, text, (), (), b""))
        if pending:
            log.warning(
                "tunnel to a replica closed",
                extra={"calls_failed": len(pending), "reason": details},
            )

    def close(self) -> None:
        self._close(self._stream, grpc.StatusCode.UNAVAILABLE, "the balancer is stopping")


class Tunnels:
    """One ``Tunnel`` per replica channel, made on first use (bounded by the replicas known)."""

    def __init__(self, max_message_bytes: int) -> None:
        self._max_message_bytes = max_message_bytes
        self._by_address: dict[str, Tunnel] = {}

    def of(self, address: str, channel: grpc.aio.Channel, known: int) -> Tunnel:
        tunnel = self._by_address.get(address)
        if tunnel is None or tunnel.channel is not channel:
            if tunnel is not None:
                tunnel.close()
            if len(self._by_address) > 2 * known + 8:  # replicas DNS no longer lists
                self.close()
            tunnel = self._by_address[address] = Tunnel(channel, self._max_message_bytes)
        return tunnel

    def close(self) -> None:
        for tunnel in self._by_address.values():
            tunnel.close()
        self._by_address.clear()
