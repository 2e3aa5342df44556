"""Who a replica acts for: decided once per call, here, and read by the services.

A call carries the balancer's signed stamp (``hashmesh.core.identity``): the replica acts for
the identity and role it names once the signature verifies against ``HASHMESH_IDENTITY_SECRET``;
a stamp that does not verify is refused (UNAUTHENTICATED). A call without a stamp comes from a
direct caller: it is ``ip:<its address>``, and an operator only with
``authorization: Bearer <HASHMESH_ADMIN_TOKEN>``. A bare ``x-hashmesh-identity``,
``x-client-id`` or a request body's ``client_id`` never decide anything.

``IdentityInterceptor`` resolves the caller before the handler runs and keeps it in a context
variable for the call; services read it with ``current_caller()``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import grpc

from hashmesh.core.errors import PermissionDenied, Unauthenticated
from hashmesh.core.handlers import Context, Handler, Streaming, Unary, rewrap
from hashmesh.core.identity import (
    IDENTITY,
    IDENTITY_SIG,
    Caller,
    StampError,
    address_identity,
    bearer_token,
    host_of,
    token_matches,
    verify,
)
from hashmesh.core.rpc import abort_with

SCOPED_SERVICES = ("/hashmesh.v1.TaskService/", "/hashmesh.v1.CacheService/")
"""Services whose handlers act for a caller (HashService serves anyone alike)."""

_CALLER: ContextVar[Caller | None] = ContextVar("hashmesh_caller", default=None)


def current_caller() -> Caller:
    """The caller of the call being served (set by ``IdentityInterceptor``)."""
    caller = _CALLER.get()
    if caller is None:
        raise RuntimeError("no caller resolved: is IdentityInterceptor installed on this server?")
    return caller


@contextmanager
def acting_as(caller: Caller) -> Iterator[None]:
    """Serve calls as ``caller`` outside gRPC (unit tests of the services)."""
    token = _CALLER.set(caller)
    try:
        yield
    finally:
        _CALLER.reset(token)


def require_operator(what: str) -> Caller:
    """The current caller if it is an operator, else PERMISSION_DENIED naming ``what``."""
    caller = current_caller()
    if not caller.operator:
        raise PermissionDenied(
            f"{what} is an operator call: send 'authorization: Bearer <HASHMESH_ADMIN_TOKEN>' "
            "(hashctl --admin-token)",
            reason="OPERATOR_ONLY",
        )
    return caller


def client_of(requested: str, caller: Caller) -> str:
    """The client a submission is stored under: always the caller's identity. A request's
    ``client_id`` may only repeat it (PERMISSION_DENIED otherwise), operators included."""
    if requested and requested != caller.identity:
        raise PermissionDenied(
            f"client_id {requested!r} is not the caller ({caller.identity!r}); leave it empty",
            reason="CLIENT_ID_NOT_CALLER",
        )
    return caller.identity


def list_scope(requested: str, caller: Caller) -> str | None:
    """Whose tasks a listing shows: the caller's own; an operator's choice (``None``: all)."""
    if caller.operator:
        return requested or None
    if requested and requested != caller.identity:
        raise PermissionDenied(
            f"client_id {requested!r} is not the caller ({caller.identity!r}); only an "
            "operator lists other clients' tasks",
            reason="CLIENT_ID_NOT_CALLER",
        )
    return caller.identity


class CallerResolver:
    """Turns (method, peer, metadata) into a ``Caller``; pure, with an injectable clock."""

    def __init__(
        self, secret: str, admin_token: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._secret = secret
        self._admin_token = admin_token
        self._clock = clock

    def resolve(
        self, method: str, peer: str, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> Caller:
        identity = signature = None
        for key, value in metadata or ():
            if key == IDENTITY_SIG:
                signature = value
            elif key == IDENTITY:
                identity = value
        if signature is not None:
            if not self._secret:
                raise Unauthenticated(
                    "this replica has no HASHMESH_IDENTITY_SECRET: it cannot accept an identity stamp",
                    reason="IDENTITY_STAMP_INVALID",
                )
            if not isinstance(signature, str) or not isinstance(identity, str):
                raise Unauthenticated("malformed identity stamp", reason="IDENTITY_STAMP_INVALID")
            try:
                return verify(self._secret, identity, signature, method, self._clock())
            except StampError as exc:
                raise Unauthenticated(str(exc), reason="IDENTITY_STAMP_INVALID") from None
        operator = False
        bearer = bearer_token(metadata)
        if bearer is not None and self._admin_token:
            if not token_matches(bearer, self._admin_token):
                raise Unauthenticated(
                    "wrong admin token (authorization: Bearer <HASHMESH_ADMIN_TOKEN>)",
                    reason="ADMIN_TOKEN_INVALID",
                )
            operator = True
        return Caller(address_identity(host_of(peer)), operator=operator)


class IdentityInterceptor(grpc.aio.ServerInterceptor):
    """Resolves the caller of every TaskService and CacheService call before its handler."""

    def __init__(self, resolver: CallerResolver) -> None:
        self._resolver = resolver
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(SCOPED_SERVICES):
            return handler
        cached = self._wrapped.get(method)  # bounded: only the two services' methods get here
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self._wrap(handler, method))
        return cached[1]

    def _wrap(self, handler: Handler, method: str) -> Handler:
        resolve = self._resolver.resolve

        async def enter(context: Context) -> None:
            try:
                caller = resolve(method, context.peer(), context.invocation_metadata())
            except Unauthenticated as error:
                await abort_with(context, error)
            _CALLER.set(caller)

        def unary(inner: Unary) -> Unary:
            async def unary_response(request: Any, context: Context) -> Any:
                await enter(context)
                return await inner(request, context)

            return unary_response

        def streaming(inner: Streaming) -> Streaming:
            async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
                await enter(context)
                async for item in inner(request, context):
                    yield item

            return stream_response

        return rewrap(handler, unary=unary, streaming=streaming)
