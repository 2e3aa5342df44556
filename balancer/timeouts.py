"""Time limits the balancer puts on calls besides the client's own deadline.

- Per-attempt timeout (gRFC A6 ``perAttemptRecvTimeout``): one attempt of an idempotent unary
  call gets at most ``attempt_timeout`` seconds; when it runs out while the call's deadline
  still has time, the attempt is abandoned and retried on another replica, so a frozen
  replica costs a call at most that long instead of the whole deadline.
- Idle client streams: a client stream that sends no message for ``idle_seconds`` ends with
  DEADLINE_EXCEEDED instead of holding a replica's stream forever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Collection

import grpc

from hashmesh.core.errors import DeadlineExceeded


class AttemptTimeout:
    """The timeout of each attempt of a call, and whether a failed attempt ran out of it."""

    def __init__(self, seconds: float, idempotent: Collection[str]) -> None:
        self._seconds = seconds
        self._idempotent = frozenset(idempotent) if seconds > 0 else frozenset()

    def cap(self, method: str, remaining: float | None) -> float | None:
        """Timeout of the next attempt, given ``remaining`` seconds of the call's deadline."""
        if method not in self._idempotent:
            return remaining
        seconds = self._seconds
        return seconds if remaining is None or remaining > seconds else remaining

    def expired(self, code: grpc.StatusCode, method: str, deadline: float | None) -> bool:
        """An attempt that ended with ``code`` ran out of its own timeout, not the call's deadline."""
        if code is not grpc.StatusCode.DEADLINE_EXCEEDED or method not in self._idempotent:
            return False
        return deadline is None or time.monotonic() < deadline - 0.01


class StreamIdle(DeadlineExceeded):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the client sent no message for {seconds:g} s; an idle stream is closed "
            "(HASHMESH_BALANCER_STREAM_IDLE_SECONDS)"
        )


async def idle_limited(
    messages: AsyncIterator[bytes], seconds: float, on_idle: Callable[[], None]
) -> AsyncIterator[bytes]:
    """``messages`` until the client waits more than ``seconds`` between two of them; then
    ``on_idle()`` and the end. ``seconds`` 0: no limit."""
    if seconds <= 0:
        async for message in messages:
            yield message
        return
    iterator = aiter(messages)
    while True:
        try:
            async with asyncio.timeout(seconds):
                message = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            on_idle()
            return
        yield message
