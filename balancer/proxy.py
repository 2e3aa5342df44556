"""The forwarding path: a generic handler that passes every call to a replica as raw bytes.

Handlers have no (de)serializers, so payloads are never decoded. Methods of the hashmesh
contract get a handler of their own kind (a unary call is not pushed through the slower
generic streaming path); any other method (server reflection, a newer replica's methods) is
forwarded as a bidirectional stream, which carries every kind, and stays on one replica for
its whole life. Small unary calls reach the replica through its tunnel (``balancer.tunnel``:
one long-lived stream per replica carrying many calls), everything else as calls of their
own. Request metadata goes through minus hop-by-hop headers, with the caller added
to ``x-forwarded-for``; the remaining deadline goes as the backend call's timeout; a client
cancelling cancels the backend call; the backend's status, details and metadata (with
``grpc-status-details-bin``) come back as they are. After the interceptors, a call takes its
budget (``balancer.budgets``) until it ends; streams hold a replica's stream slot, never a
unary one; attempts of idempotent unary calls get the per-attempt timeout
(``balancer.timeouts``) and are retried elsewhere when their replica goes down."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from hashmesh.balancer.backends import KNOWN_METHODS, BackendSet, Replica
from hashmesh.balancer.budgets import OTHER, UPLOAD, WATCH, Budgets
from hashmesh.balancer.budgets import UNARY as UNARY_BUDGET
from hashmesh.balancer.config import BalancerSettings
from hashmesh.balancer.interceptors import (
    ADMIN_PREFIX,
    AdminPolicy,
    CallInfo,
    CallInterceptor,
    read_call,
    refusing_handler,
)
from hashmesh.balancer.metrics import CallMetrics, MethodCalls
from hashmesh.balancer.stats import BalancerStats
from hashmesh.balancer.timeouts import AttemptTimeout, StreamIdle, idle_limited
from hashmesh.balancer.tunnel import LOST, NOT_SENT, Tunnels
from hashmesh.core.errors import HashmeshError, Unavailable, to_grpc_status
from hashmesh.core.handlers import Context, Handler
from hashmesh.core.rpc import abort_with
from hashmesh.core.tunnel import INTERNAL_PREFIX, Reply

log = logging.getLogger(__name__)

UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI = (
    "unary_unary",
    "stream_unary",
    "unary_stream",
    "stream_stream",
)

# Failures where the request never reached a replica: safe to send elsewhere for any method.
_NOT_CONNECTED = re.compile(
    r"failed to connect|connection refused|connections to all backends failing|"
    r"name resolution|no route to host|connect failed|" + re.escape(NOT_SENT),
    re.IGNORECASE,
)
_OK = grpc.StatusCode.OK
# Transport failures (the above, or a connection lost): they count toward passive ejection.
_TRANSPORT = re.compile(
    _NOT_CONNECTED.pattern + r"|socket closed|connection reset|broken pipe|goaway|"
    r"connection aborted|end of tcp stream|stream removed|recvmsg|sendmsg|keepalive",
    re.IGNORECASE,
)


def method_kinds() -> dict[str, str]:
    """Kind of every method in the hashmesh contract, from the generated descriptors."""
    from hashmesh.v1 import admin_pb2, cache_pb2, hash_pb2, task_pb2

    kinds: dict[str, str] = {}
    for module in (hash_pb2, task_pb2, cache_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                kind = {
                    (False, False): UNARY,
                    (True, False): CLIENT_STREAM,
                    (False, True): SERVER_STREAM,
                    (True, True): BIDI,
                }[(method.client_streaming, method.server_streaming)]
                kinds[f"/{service.full_name}/{method.name}"] = kind
    return kinds


class RetryBudget:
    """Finagle's retry budget: each call deposits ``ratio`` of a retry, each retry withdraws
    one, plus ``min_per_second`` always allowed, so a failing mesh is not hammered."""

    def __init__(
        self, ratio: float, min_per_second: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ratio = ratio
        self._min = min_per_second
        self._clock = clock
        self._deposits = 0.0
        self._reserve = min_per_second
        self._refilled = clock()
        self._cap = max(10.0, min_per_second) * 10

    def deposit(self) -> None:
        deposits = self._deposits + self._ratio
        self._deposits = deposits if deposits < self._cap else self._cap

    def withdraw(self) -> bool:
        now = self._clock()
        self._reserve = min(self._min, self._reserve + (now - self._refilled) * self._min)
        self._refilled = now
        if self._deposits >= 1.0 - 1e-9:  # 5 deposits of 0.2 sum to 0.999...
            self._deposits -= 1.0
            return True
        if self._reserve >= 1.0:
            self._reserve -= 1.0
            return True
        return False


class Relayed(grpc.Status):
    """A replica's status as it came, passed on through the one gRPC edge (``abort_with``)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def _pairs(metadata: Any) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(metadata) if metadata else ()


class Proxy:
    """Forwards calls to the replicas picked by ``backends``; one instance per balancer."""

    def __init__(
        self,
        settings: BalancerSettings,
        backends: BackendSet,
        chain: Sequence[CallInterceptor],
        stats: BalancerStats,
        call_metrics: CallMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._call_metrics = call_metrics
        self._backends = backends
        self._chain = tuple(chain)
        self._stats = stats
        self._idempotent = frozenset(settings.idempotent_methods)
        self._max_attempts = settings.max_attempts
        self.budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_min)
        self.budgets = Budgets(settings.budgets)
        self._attempt = AttemptTimeout(settings.attempt_timeout, settings.idempotent_methods)
        self._stream_idle = settings.budgets.stream_idle_seconds
        self._tunnels = (
            Tunnels(
                settings.wire_message_bytes,
                sockets=settings.tunnel_socket and settings.upstream_tls is None,
            )
            if settings.tunnel
            else None
        )

    def close(self) -> None:
        """End the tunnels (calls still waiting on them fail with UNAVAILABLE)."""
        if self._tunnels is not None:
            self._tunnels.close()

    # -- shared steps ----------------------------------------------------------------------

    async def _admit(self, method: str, context: Context, kind: int, size: int = 0) -> CallInfo:
        self._stats.calls += 1
        self.budget.deposit()
        call = read_call(
            method, context.peer(), context.invocation_metadata(), self._backends.hash_key
        )
        try:
            for interceptor in self._chain:
                await interceptor.admit(call)
            # The stubs type the callback as a class of theirs; grpc takes any callable.
            on_done = context.add_done_callback
            self.budgets.hold(call.client, kind, size, call.metadata, on_done)  # type: ignore[arg-type]
        except HashmeshError as error:
            await _abort(context, error, call.ratelimit)
        return call

    def _pick(self, call: CallInfo, tried: list[Replica], stream: bool = False) -> Replica:
        pick = self._backends.pick_stream if stream else self._backends.pick
        replica = pick(call.hash_value, tried)
        if replica is None:
            if tried:
                # Every other replica failed or is full: give the first one another go.
                replica = pick(call.hash_value, ())
            if replica is None:
                self._stats.no_backend += 1
                if self._backends.fallback:
                    raise Unavailable(
                        "every replica is at its in-flight cap",
                        retry_after=0.1,
                        reason="REPLICAS_BUSY",
                    )
                raise Unavailable("no replica is ready", retry_after=0.1, reason="NO_REPLICA")
        return replica

    def _may_retry(
        self,
        code: grpc.StatusCode,
        details: str,
        method: str,
        attempt: int,
        deadline: float | None,
        replayable: bool,
    ) -> bool:
        if attempt >= self._max_attempts or (
            code is not grpc.StatusCode.UNAVAILABLE
            and not self._attempt.expired(code, method, deadline)
        ):
            return False
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if not (replayable and method in self._idempotent) and not _NOT_CONNECTED.search(details):
            return False
        if not self.budget.withdraw():
            return False
        self._stats.retries += 1
        return True

    def _may_fail_over(self, attempt: int, deadline: float | None) -> bool:
        if attempt >= self._max_attempts or (deadline is not None and time.monotonic() >= deadline):
            return False
        if not self.budget.withdraw():
            return False
        self._stats.retries += 1
        return True

    def _failed(
        self,
        replica: Replica,
        code: grpc.StatusCode,
        details: str,
        method: str = "",
        deadline: float | None = None,
    ) -> None:
        if (
            code is grpc.StatusCode.UNAVAILABLE and _TRANSPORT.search(details)
        ) or self._attempt.expired(code, method, deadline):
            self._backends.connection_failed(replica)

    # -- the four kinds --------------------------------------------------------------------

    def handler(self, method: str, kind: str) -> Handler:
        # Two shapes: unary calls (the hot path, through the tunnel) and one relay for the three
        # streaming kinds. Each records its call in ``calls`` itself (no wrapping layer): ``ok``
        # before returning, ``ended`` from an ``except BaseException`` around the whole call.
        if kind == UNARY:
            return grpc.unary_unary_rpc_method_handler(self._unary(method))
        relay = self._streaming(method, kind)
        if kind == CLIENT_STREAM:
            return grpc.stream_unary_rpc_method_handler(functools.partial(_upload, relay))

        if kind == SERVER_STREAM:

            async def watch(request: bytes, context: Context) -> AsyncIterator[bytes]:
                async for message in relay(_once(request), context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(watch)
        return grpc.stream_stream_rpc_method_handler(relay)

    def _method_calls(self, method: str) -> MethodCalls | None:
        return self._call_metrics.method(method) if self._call_metrics is not None else None

    def _unary(self, method: str) -> Callable[[bytes, Context], Any]:
        calls = self._method_calls(method)
        idempotent = method in self._idempotent

        async def forward(request: bytes, context: Context) -> bytes:
            """The one entry point of every proxied unary call."""
            arrived = 0.0
            if calls is not None:  # no clock read when no metrics will use it
                arrived = time.perf_counter()
                calls.in_flight += 1
            try:
                call = await self._admit(method, context, UNARY_BUDGET, len(request))
                timeout = context.time_remaining()
                deadline = None if timeout is None else time.monotonic() + timeout
                tried: list[Replica] = []
                attempt = 1
                while True:
                    try:
                        replica = self._pick(call, tried)
                    except HashmeshError as error:
                        await _abort(context, error, call.ratelimit)
                    replica.in_flight += 1
                    started = time.perf_counter()
                    # An idempotent attempt is failed over if its replica goes down meanwhile:
                    # ``Replica.fail_over`` cancels this handler's task, which is taken back here.
                    handler = asyncio.current_task() if idempotent else None
                    if handler is not None:
                        replica.attempts.add(handler)
                    try:
                        reply = await self._send_unary(
                            replica,
                            method,
                            request,
                            self._attempt.cap(method, timeout),
                            call.metadata,
                        )
                    except asyncio.CancelledError:
                        if handler is None or not replica.was_failed_over(handler):
                            raise
                        handler.uncancel()
                        if self._may_fail_over(attempt, deadline):
                            attempt += 1
                            tried.append(replica)
                            timeout = None if deadline is None else deadline - time.monotonic()
                            continue
                        await _abort(
                            context,
                            Unavailable(
                                f"replica {replica.address} went down during the call",
                                retry_after=0.1,
                            ),
                            call.ratelimit,
                        )
                    finally:
                        replica.in_flight -= 1
                        if handler is not None:
                            replica.attempts.discard(handler)
                    code = reply.code
                    if code is _OK:
                        replica.stats.record(time.perf_counter() - started, True)
                        replica.failures = 0
                        # The replica's headers plus ours (the rate-limit fields, when near
                        # exhaustion: sending headers costs a batch of its own), its trailers
                        # plus the rate-limit fields (free: they ride the final batch).
                        headers = call.unary_headers
                        if headers or reply.initial:
                            await context.send_initial_metadata(reply.initial + headers)
                        trailing = reply.trailing + call.ratelimit
                        if trailing:
                            context.set_trailing_metadata(trailing)
                        if calls is not None:
                            calls.ok(arrived)
                        return reply.payload
                    replica.stats.record(time.perf_counter() - started, False)
                    self._failed(replica, code, reply.details, method, deadline)
                    if self._may_retry(code, reply.details, method, attempt, deadline, True):
                        attempt += 1
                        tried.append(replica)
                        timeout = None if deadline is None else deadline - time.monotonic()
                        continue
                    await abort_with(
                        context,
                        Relayed(code, reply.details, reply.trailing + call.ratelimit),
                        initial_metadata=reply.initial + call.unary_headers,
                    )
            except BaseException as exc:
                if calls is not None:
                    calls.ended(context, exc, arrived)
                raise

        return forward

    async def _send_unary(
        self,
        replica: Replica,
        method: str,
        request: bytes,
        timeout: float | None,
        metadata: Sequence[tuple[str, str | bytes]],
    ) -> Reply:
        """One attempt on ``replica``: through its tunnel when it has one and the request is
        small, else as a call of its own. Errors come back as the ``Reply``, not raised."""
        if self._tunnels is not None:
            tunnel = self._tunnels.of(
                replica.address, replica.channel, len(self._backends.replicas)
            )
            if not tunnel.unsupported and len(request) <= tunnel.max_payload:
                reply = await tunnel.unary(method, metadata, timeout, request)
                # A tunnel that ended is never the call's answer: the call goes again on its own
                # when that is safe (never sent, or idempotent); a replica that is really gone
                # then fails that call as any call, and the usual retries apply.
                ended = reply.code is not _OK and reply.details.startswith((NOT_SENT, LOST))
                if not tunnel.unsupported and not (
                    ended and (reply.details.startswith(NOT_SENT) or method in self._idempotent)
                ):
                    return reply
                # The replica has no tunnel (nothing reached a handler), or the tunnel broke.
        rpc = replica.multicallable(UNARY, method)(request, timeout=timeout, metadata=metadata)
        try:
            response = await rpc
        except grpc.aio.AioRpcError as err:
            return Reply(
                0,
                err.code(),
                err.details() or "",
                _pairs(err.initial_metadata()),
                _pairs(err.trailing_metadata()),
                b"",
            )
        except BaseException:
            rpc.cancel()
            raise
        return Reply(
            0,
            _OK,
            "",
            _pairs(await rpc.initial_metadata()),
            _pairs(await rpc.trailing_metadata()),
            response,
        )

    def _streaming(
        self, method: str, kind: str
    ) -> Callable[[AsyncIterator[bytes], Context], AsyncIterator[bytes]]:
        """The one relay of every streaming kind: the replica is called as a bidirectional
        stream (the wire is the same for all kinds), the client's messages fed to it, its
        messages passed back; ``handler`` fits it to the kind the client called."""
        calls = self._method_calls(method)
        budget = UPLOAD if kind == CLIENT_STREAM else WATCH if kind == SERVER_STREAM else OTHER
        # A single request cannot go idle; a response stream lasts as long as the client
        # watches, so only an upload's length is latency.
        idle_seconds = 0.0 if kind == SERVER_STREAM else self._stream_idle
        timed = kind == CLIENT_STREAM

        async def relay(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
            arrived = time.perf_counter()
            if calls is not None:
                calls.in_flight += 1
            try:
                call = await self._admit(method, context, budget)
                source = _Replayable(requests, idle_seconds)
                attempts = _Attempts(self, call, method, context, source, timed=timed)
                while True:
                    replica, timeout = await attempts.next()
                    rpc = replica.multicallable(BIDI, method)(
                        timeout=timeout, metadata=call.metadata
                    )
                    source.start(rpc)
                    try:
                        await _relay_initial(context, rpc, source, call.ratelimit)
                        async for message in rpc:
                            if not source.replied:
                                await _first_reply(context, source, call.ratelimit)
                            yield message
                    except grpc.aio.AioRpcError as err:
                        await source.stop()
                        await attempts.failed(err)
                        continue
                    except BaseException:
                        attempts.abandoned(rpc)
                        await source.stop()
                        if source.idle:
                            await _abort(context, StreamIdle(self._stream_idle), call.ratelimit)
                        raise
                    attempts.succeeded()
                    await source.stop()
                    await _relay_metadata(context, rpc, call.ratelimit, initial_sent=source.replied)
                    if calls is not None:
                        calls.ok(arrived)
                    return
            except BaseException as exc:
                if calls is not None:
                    calls.ended(context, exc, arrived)
                raise

        return relay


async def _upload(
    relay: Callable[[AsyncIterator[bytes], Context], AsyncIterator[bytes]],
    requests: AsyncIterator[bytes],
    context: Context,
) -> bytes:
    """A client stream: the relay run to its end (its status and trailers set), its one
    message the answer."""
    response: bytes | None = None
    async for message in relay(requests, context):
        response = message
    if response is None:
        await abort_with(
            context, Relayed(grpc.StatusCode.INTERNAL, "the replica answered without a message")
        )
    return response  # type: ignore[return-value]


async def _once(request: bytes) -> AsyncIterator[bytes]:
    yield request


class _Replayable:
    """A client's request stream, fed to the backend call by a task of ours (not grpc's), so
    that it can be stopped before the status goes back to the client: a read of the client's
    stream still pending while the handler sends its status makes grpc.aio answer INTERNAL.

    It can be sent again while at most its first message was taken and nothing came back:
    then the replica cannot have acted on more than that one message, and a retry happens
    only when the connection never came up or the method is idempotent."""

    def __init__(self, requests: AsyncIterator[bytes], idle_seconds: float = 0.0) -> None:
        self._requests = requests
        self._idle_seconds = idle_seconds
        self.idle = False
        self._first: bytes | None = None
        self._pump: asyncio.Task[None] | None = None
        self.taken = 0
        self.replied = False

    @property
    def replayable(self) -> bool:
        return self.taken <= 1 and not self.replied

    def start(self, rpc: Any) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._feed(rpc))

    async def _feed(self, rpc: Any) -> None:
        try:
            await rpc.wait_for_connection()
            # grpc.aio's own write() turns a write that loses the race with the backend's
            # status (it answered before reading, e.g. UNIMPLEMENTED) into INTERNAL for the
            # whole call, hiding the real status; sending through the call object beneath
            # lets that write fail alone. Public write() if that object ever goes away.
            send = (
                getattr(getattr(rpc, "_cython_call", None), "send_serialized_message", None)
                or rpc.write
            )
            if self._first is not None:
                await send(self._first)
            async for message in idle_limited(
                self._requests, self._idle_seconds, lambda: self._went_idle(rpc)
            ):
                self.taken += 1
                self._first = message if self.taken == 1 else None
                if rpc.done():
                    return
                await send(message)
            await rpc.done_writing()
        except Exception:  # the backend call ended: its status says why
            log.debug("request stream stopped", exc_info=True)

    def _went_idle(self, rpc: Any) -> None:
        self.idle = True
        rpc.cancel()

    async def stop(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)


class _Attempts:
    """Bookkeeping of a streaming call's attempts: picks, in-flight counts, stats, retries,
    relaying the final error, cancelling the backend call when the client goes away."""

    def __init__(
        self,
        proxy: Proxy,
        call: CallInfo,
        method: str,
        context: Context,
        source: _Replayable,
        *,
        timed: bool = True,
    ) -> None:
        self._proxy = proxy
        # A response stream lasts as long as the client watches: its length is no latency.
        self._timed = timed
        self._call = call
        self._method = method
        self._context = context
        self._source = source
        self._tried: list[Replica] = []
        self._replica: Replica | None = None
        self._started = 0.0
        timeout = context.time_remaining()
        self._deadline = None if timeout is None else time.monotonic() + timeout

    async def next(self) -> tuple[Replica, float | None]:
        try:
            replica = self._proxy._pick(self._call, self._tried, stream=True)
        except HashmeshError as error:
            await _abort(self._context, error, self._call.ratelimit)
        replica.streams += 1
        self._replica = replica
        self._started = time.perf_counter()
        timeout = None if self._deadline is None else self._deadline - time.monotonic()
        return replica, timeout

    def _finish(self, ok: bool) -> Replica | None:
        replica, self._replica = self._replica, None
        if replica is not None:
            replica.streams -= 1
            replica.stats.record(time.perf_counter() - self._started if self._timed else None, ok)
        return replica

    def succeeded(self) -> None:
        replica = self._finish(True)
        if replica is not None:
            replica.failures = 0

    def abandoned(self, rpc: Any) -> None:
        """The client cancelled (or we aborted): stop the backend call too."""
        if not rpc.done():
            rpc.cancel()
        self._finish(False)

    async def failed(self, err: grpc.aio.AioRpcError) -> None:
        """Returns to retry on another replica; otherwise relays ``err`` (which raises)."""
        replica = self._finish(False)
        assert replica is not None
        code, details = err.code(), err.details() or ""
        self._proxy._failed(replica, code, details)
        attempt = len(self._tried) + 1
        if self._source.replayable and self._proxy._may_retry(
            code, details, self._method, attempt, self._deadline, self._source.replayable
        ):
            self._tried.append(replica)
            return
        await _relay_error(
            self._context, err, self._call.ratelimit, initial_sent=self._source.replied
        )


async def _relay_metadata(
    context: Context,
    rpc: Any,
    reply: tuple[tuple[str, str], ...],
    *,
    initial_sent: bool = False,
) -> None:
    """The backend's headers plus ours (the rate-limit fields), then its trailers plus ours."""
    if not initial_sent:
        initial = _pairs(await rpc.initial_metadata()) + reply
        if initial:
            await context.send_initial_metadata(initial)
    trailing = _pairs(await rpc.trailing_metadata()) + reply
    if trailing:
        context.set_trailing_metadata(trailing)


async def _relay_initial(
    context: Context,
    rpc: Any,
    source: _Replayable,
    reply: tuple[tuple[str, str], ...],
) -> None:
    """Streams: the backend's headers (plus ours) go to the client before its first message."""
    initial = await rpc.initial_metadata()
    if initial:
        source.replied = True
        await context.send_initial_metadata(_pairs(initial) + reply)


async def _first_reply(
    context: Context, source: _Replayable, reply: tuple[tuple[str, str], ...]
) -> None:
    """Before the first message of a backend that sent no headers of its own: ours."""
    source.replied = True
    if reply:
        await context.send_initial_metadata(reply)


async def _relay_error(
    context: Context,
    err: grpc.aio.AioRpcError,
    reply: tuple[tuple[str, str], ...],
    *,
    initial_sent: bool = False,
) -> None:
    """The backend's status, details and trailing metadata, unchanged; our fields in the
    headers (unless they went already) and after its trailers."""
    await abort_with(
        context,
        Relayed(err.code(), err.details() or "", _pairs(err.trailing_metadata()) + reply),
        initial_metadata=() if initial_sent else _pairs(err.initial_metadata()) + reply,
    )


async def _abort(context: Context, error: HashmeshError, reply: tuple[tuple[str, str], ...]) -> Any:
    """The balancer's own refusal, through the one gRPC edge; the rate-limit fields go in the
    headers (a client slowing down reads them there) and in the trailers, as on every answer."""
    if not reply:
        await abort_with(context, error)  # raises: the call ends here
    status = to_grpc_status(error)
    await abort_with(
        context,
        Relayed(status.code, status.details, tuple(status.trailing_metadata) + reply),
        initial_metadata=reply,
    )


class Router(grpc.GenericRpcHandler):
    """The public listener's catch-all: AdminService behind its policy, the rest proxied."""

    def __init__(
        self, proxy: Proxy, admin_handlers: dict[str, Handler], policy: AdminPolicy
    ) -> None:
        self._proxy = proxy
        self._kinds = method_kinds()
        self._admin = admin_handlers
        self._policy = policy
        self._handlers: dict[str, Handler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = details.method
        handler = self._handlers.get(method)
        if handler is not None:
            return handler
        if method.startswith(INTERNAL_PREFIX):
            return (
                None  # the tunnel is the balancer's own: a client may not reach it (UNIMPLEMENTED)
            )
        if method.startswith(ADMIN_PREFIX):
            try:
                self._policy.check(details.invocation_metadata)
            except HashmeshError as error:
                return refusing_handler(error)
            return self._admin.get(method.rsplit("/", 1)[1])
        handler = self._proxy.handler(method, self._kinds.get(method, BIDI))
        if method in KNOWN_METHODS:  # other names are the client's choice: never kept
            self._handlers[method] = handler
        return handler
