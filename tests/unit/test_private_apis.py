"""The private names of dependencies the mesh still relies on, each for a written reason, each
checked here so that an upgrade that removes one fails this test instead of a fast path
quietly falling back (or a call breaking) in production."""

from __future__ import annotations

import asyncio
import inspect

from aiolimiter import AsyncLimiter
from grpc._cython import cygrpc
from grpc.aio import _call, _channel


def test_grpc_aio_calls_still_write_through_their_cython_call() -> None:
    # balancer/proxy.py sends pre-serialized request bytes through ``rpc._cython_call`` so that
    # a write the replica refuses fails alone instead of turning the call's status INTERNAL.
    assert "self._cython_call" in inspect.getsource(_call)
    assert callable(getattr(cygrpc._AioCall, "send_serialized_message", None))


def test_grpc_aio_channels_still_take_registered_methods() -> None:
    # balancer/backends.py registers the contract's methods with the channel once
    # (``_registered_method=True``): grpc then skips a per-call method-name lookup.
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        assert "_registered_method" in inspect.signature(getattr(_channel.Channel, kind)).parameters


def test_aiolimiter_still_keeps_its_bucket_level() -> None:
    # balancer/ratelimit.py reads ``_level`` for the RateLimit "remaining" field: aiolimiter
    # has no public reading of how full a bucket is. It also takes a token by raising
    # ``_level`` after ``has_capacity`` (what ``acquire`` does when nobody waits).
    async def taken() -> tuple[float, bool]:
        limiter = AsyncLimiter(2, 1000)
        await limiter.acquire()
        level = float(limiter._level)
        assert limiter.has_capacity(1)
        limiter._level += 1
        return level, limiter.has_capacity(1)

    assert asyncio.run(taken()) == (1.0, False)
    assert "self._level += amount" in inspect.getsource(AsyncLimiter.acquire)
