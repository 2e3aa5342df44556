"""Rebuilding a grpc.aio method handler around new behaviour, keeping its kind and serializers:
the one piece every handler-wrapping server interceptor shares (errors and deadlines in
``hashmesh.core.rpc``, call metrics in ``hashmesh.core.metrics``, the caller's identity in
``hashmesh.hashd.identity``)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc

# Quoted: grpc's classes are generic in the stubs only.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Deserializer: TypeAlias = Callable[[bytes], Any]
Unary: TypeAlias = Callable[[Any, Context], Awaitable[Any]]
"""A method that answers once (unary-unary, stream-unary); its first argument is the request,
or the async iterator of requests when the method streams them."""
Streaming: TypeAlias = Callable[[Any, Context], AsyncIterator[Any]]
"""A method that streams its answers (unary-stream, stream-stream)."""


def _as_unary(behaviour: Callable[..., Any]) -> Unary:
    if inspect.iscoroutinefunction(behaviour):
        return cast(Unary, behaviour)

    async def call(request: Any, context: Context) -> Any:
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result

    return call


def _as_streaming(behaviour: Callable[..., Any]) -> Streaming:
    if inspect.isasyncgenfunction(behaviour):
        return cast(Streaming, behaviour)

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        produced = behaviour(request, context)
        if inspect.isawaitable(produced):  # a handler that writes with context.write() (Watch)
            await produced
            return
        async for item in produced:
            yield item

    return stream


def rewrap(
    handler: Handler,
    *,
    unary: Callable[[Unary], Unary],
    streaming: Callable[[Streaming], Streaming],
    request_deserializer: Deserializer | None = None,
) -> Handler:
    """``handler`` of the same kind, its behaviour replaced by ``unary(inner)`` when it answers
    once or ``streaming(inner)`` when it streams answers; ``inner`` is the old behaviour as a
    coroutine function or async generator function whatever it was written as. The request
    deserializer stays unless ``request_deserializer`` replaces it."""
    deserializer = request_deserializer or handler.request_deserializer
    serializer = handler.response_serializer
    # The stubs type behaviours after the synchronous server's; on grpc.aio they are
    # coroutine functions and async generators, which is what Unary and Streaming say.
    behaviour: Callable[..., Any]
    once = handler.unary_unary or handler.stream_unary
    if once is not None:
        behaviour = unary(_as_unary(once))
        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.stream_unary_rpc_method_handler
        )
    else:
        streams = handler.unary_stream or handler.stream_stream
        if streams is None:
            raise ValueError("a method handler without behaviour")
        behaviour = streaming(_as_streaming(streams))
        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream is not None
            else grpc.stream_stream_rpc_method_handler
        )
    return factory(behaviour, deserializer, serializer)
