"""The gRPC server frame every hashmesh daemon uses.

One place decides: how domain errors become statuses (``ErrorInterceptor``), that every server
serves grpc.health.v1 (``Health``, with ``List``) and server reflection v1 and v1alpha with the
contract's comments (``hashmesh.core.reflection``), and how a daemon shuts down (NOT_SERVING first,
then stop taking calls, then give in-flight calls a grace period)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from hashmesh.core.errors import DeadlineExceeded, HashmeshError, InvalidArgument, to_grpc_status
from hashmesh.core.handlers import Context, Handler, Streaming, Unary, rewrap
from hashmesh.core.reflection import HEALTH, add_reflection
from hashmesh.core.tls import ServerTls
from hashmesh.core.tunnel import TunnelServer
from hashmesh.core.tunnel_socket import SocketListener

log = logging.getLogger(__name__)

Behavior = Callable[..., Any]
METADATA_LIMIT_BYTES = 64 * 1024
"""Request metadata every server accepts; the balancer refuses far less with a clear status
(``HASHMESH_BALANCER_MAX_METADATA_BYTES``), so what it forwards always fits."""
MAX_WRAPPED_METHODS = 1024
"""Handlers kept wrapped; far above the methods a server has, a bound whatever it routes."""


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns ``HashmeshError`` into its status and anything unexpected into a logged INTERNAL;
    refuses calls whose deadline already passed before any work starts."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown names are the caller's choice: never remembered
            return None
        wrapped = _guarded(handler, method)
        if len(self._wrapped) < MAX_WRAPPED_METHODS:
            self._wrapped[method] = wrapped
        return wrapped


async def abort_with(
    context: Context,
    error: HashmeshError | grpc.Status,
    *,
    initial_metadata: Sequence[tuple[str, str | bytes]] = (),
) -> None:
    """End the call with ``error``'s status (``hashmesh.core.errors.to_grpc_status``): the one
    place hashd and the balancer turn a domain error into what the caller receives. A
    ``grpc.Status`` is sent as it is (the balancer passing a replica's answer on).
    ``initial_metadata`` goes out first (the replica's headers, the balancer's rate-limit
    fields)."""
    status = to_grpc_status(error) if isinstance(error, HashmeshError) else error
    if initial_metadata:
        await context.send_initial_metadata(tuple(initial_metadata))
    await context.abort(
        status.code, status.details, trailing_metadata=tuple(status.trailing_metadata)
    )


async def _translate(context: Context, method: str, exc: BaseException) -> None:
    if isinstance(exc, HashmeshError):
        await abort_with(context, exc)
    log.exception("unexpected error in %s", method, extra={"method": method})
    await abort_with(context, HashmeshError(f"internal error in {method}"))


def _deadline_passed(context: Context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class _Malformed:
    """Stands for a request message that did not parse."""


MALFORMED = _Malformed()


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` answering ``MALFORMED`` instead of raising: grpc would otherwise log a
    traceback and answer UNKNOWN for bytes that are not the expected message."""
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError:
            return MALFORMED

    return parse


def _malformed(method: str) -> InvalidArgument:
    return InvalidArgument(
        "request", f"is not a valid request message for {method}", reason="MALFORMED_REQUEST"
    )


async def _checked(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if request is MALFORMED:
            raise _malformed(method)
        yield request


def _guarded(handler: Handler, method: str) -> Handler:
    expired = DeadlineExceeded("deadline passed before the call started")
    streamed = handler.request_streaming

    async def refuse_early(request: Any, context: Context) -> None:
        if _deadline_passed(context):
            await abort_with(context, expired)
        if request is MALFORMED:
            await abort_with(context, _malformed(method))

    def unary(inner: Unary) -> Unary:
        async def unary_response(request: Any, context: Context) -> Any:
            await refuse_early(request, context)
            try:
                return await inner(_checked(request, method) if streamed else request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _translate(context, method, exc)

        return unary_response

    def streaming(inner: Streaming) -> Streaming:
        async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
            await refuse_early(request, context)
            try:
                async for item in inner(
                    _checked(request, method) if streamed else request, context
                ):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _translate(context, method, exc)

        return stream_response

    return rewrap(
        handler,
        unary=unary,
        streaming=streaming,
        request_deserializer=_lenient(handler.request_deserializer),
    )


# types-grpcio-health-checking predates Health.List: the messages exist at run time only.
_HealthListResponse: Callable[..., Message] = health_pb2.HealthListResponse  # type: ignore[attr-defined]


class Health(health_aio.HealthServicer):
    """grpc.health.v1 with ``List`` too (grpcio-health-checking's asyncio servicer answers it
    UNIMPLEMENTED): every service name set so far and its status, as ``Check`` answers it."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._shutting_down = False

    async def set(self, service: str, status: int) -> None:
        await super().set(service, status)
        if not self._shutting_down:  # the servicer ignores changes from then on, so do we
            self._statuses[service] = status

    async def enter_graceful_shutdown(self) -> None:
        self._shutting_down = True
        await super().enter_graceful_shutdown()
        self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def List(self, request: Message, context: Context) -> Message:
        return _HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._statuses.items()
            }
        )


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        # gRPC refuses metadata between its soft (8 KiB) and hard (16 KiB) limits at random;
        # one limit for both makes the answer the same every time.
        ("grpc.max_metadata_size", METADATA_LIMIT_BYTES),
        ("grpc.absolute_max_metadata_size", METADATA_LIMIT_BYTES),
    ]


LIVENESS_SERVICE = "hashmesh.liveness"
"""A grpc.health.v1 service name that is SERVING for as long as the process runs, whatever
it can serve: what a liveness probe asks (the empty name says whether it can serve)."""


class GrpcServer:
    """A grpc.aio server with health and reflection, bound to one address.

    Register services with ``add(register, service_name, servicer)`` before ``start()``."""

    def __init__(
        self,
        listen: str,
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        tls: ServerTls | None = None,
        credentials: grpc.ServerCredentials | None = None,
        extra_options: Sequence[tuple[str, Any]] = (),
        tunnel_socket: bool = True,
    ) -> None:
        self.listen = listen
        self._tunnel_socket = tunnel_socket
        chain = [*interceptors, ErrorInterceptor()]
        self.server = grpc.aio.server(
            interceptors=chain,
            options=[*server_options(max_message_bytes), *extra_options],
        )
        # The balancer's unary calls arrive batched on one stream (hashmesh.core.tunnel).
        self.tunnel = TunnelServer(chain, max_message_bytes)
        self._max_message_bytes = max_message_bytes
        self.server.add_generic_rpc_handlers([self.tunnel])
        self.health = Health()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self._tls = tls
        """Its certificate files are read by ``start()``: constructing a server does no I/O."""
        self._credentials = credentials
        self.port = 0

    def add(
        self, register: Callable[[Any, grpc.aio.Server], None], service_name: str, servicer: Any
    ) -> None:
        register(servicer, self.server)
        self.tunnel.record(register, servicer)
        self._service_names.append(service_name)

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        add_reflection(self.server, [*self._service_names, HEALTH])
        credentials = self._credentials
        if credentials is None and self._tls is not None:
            credentials = self._tls.credentials()  # a file that cannot be read fails here
        try:
            if credentials is not None:
                self.port = self.server.add_secure_port(self.listen, credentials)
            else:
                self.port = self.server.add_insecure_port(self.listen)
        except RuntimeError:  # grpc raises for an address it cannot parse or bind
            self.port = 0
        if not self.port:
            raise OSError(f"cannot listen on {self.listen} (address in use or not local)")
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if credentials is None and self._tunnel_socket:  # plaintext: a socket for tunnel calls
            self.tunnel.socket = SocketListener(self.tunnel, self._max_message_bytes)
            await self.tunnel.socket.start(self.listen.rsplit(":", 1)[0].strip("[]"))
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first, then refuse new calls and give in-flight ones ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.tunnel.socket is not None:
            await self.tunnel.socket.close()
