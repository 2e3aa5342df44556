"""``rewrap`` keeps a handler's kind and serializers and hands the wrapper one form of
behaviour whatever the handler was written as (coroutine, plain function, async generator,
or a coroutine that writes with ``context.write``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hashmesh.core.handlers import Streaming, Unary, rewrap


def _tagging_unary(inner: Unary) -> Unary:
    async def call(request: Any, context: Any) -> Any:
        return ("wrapped", await inner(request, context))

    return call


def _tagging_streaming(inner: Streaming) -> Streaming:
    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        yield "first"
        async for item in inner(request, context):
            yield item

    return stream


def _rewrapped(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    return rewrap(handler, unary=_tagging_unary, streaming=_tagging_streaming)


async def _collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


def test_answering_once_from_a_coroutine_or_a_plain_function() -> None:
    async def coroutine(request: Any, context: Any) -> Any:
        return request * 2

    def plain(request: Any, context: Any) -> Any:
        return request * 3

    for factory, behaviour, expected in (
        (grpc.unary_unary_rpc_method_handler, coroutine, 4),
        (grpc.stream_unary_rpc_method_handler, plain, 6),
    ):
        handler = factory(behaviour, request_deserializer=int, response_serializer=str)
        wrapped = _rewrapped(handler)
        assert wrapped.request_streaming == handler.request_streaming
        assert wrapped.response_streaming is False
        assert (wrapped.request_deserializer, wrapped.response_serializer) == (int, str)
        inner = wrapped.unary_unary or wrapped.stream_unary
        assert asyncio.run(inner(2, None)) == ("wrapped", expected)  # type: ignore[misc]


def test_streaming_from_an_async_generator_or_a_writing_coroutine() -> None:
    written: list[Any] = []

    class Context:
        async def write(self, message: Any) -> None:
            written.append(message)

    async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
        yield request

    async def writer(request: Any, context: Any) -> None:  # grpc health's Watch
        await context.write(request)

    generated = _rewrapped(grpc.unary_stream_rpc_method_handler(generator))
    assert generated.unary_stream is not None
    assert asyncio.run(_collect(generated.unary_stream(7, None))) == ["first", 7]  # type: ignore[arg-type]

    writing = _rewrapped(grpc.stream_stream_rpc_method_handler(writer))
    assert writing.stream_stream is not None and writing.request_streaming
    assert asyncio.run(_collect(writing.stream_stream(8, Context()))) == ["first"]  # type: ignore[arg-type]
    assert written == [8]


def test_the_request_deserializer_can_be_replaced() -> None:
    async def echo(request: Any, context: Any) -> Any:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo, request_deserializer=int)
    wrapped = rewrap(handler, unary=_tagging_unary, streaming=_tagging_streaming,
                     request_deserializer=float)  # fmt: skip
    assert wrapped.request_deserializer is float


def test_a_handler_without_behaviour_is_refused() -> None:
    empty = grpc.unary_unary_rpc_method_handler(None)
    with pytest.raises(ValueError, match="without behaviour"):
        _rewrapped(empty)
