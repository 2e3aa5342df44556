"""The public listener on grpcio's synchronous server, its calls answered by the asyncio core.

grpc.aio's server makes about four round trips through its poller thread per unary call;
grpcio's synchronous server hands each call to a thread of a pool from C-core directly. Its
inbound side costs ~0.65x the CPU of grpc.aio's, and still ~0.65x with each answer computed
by a coroutine on an event loop in another thread (``bench/inbound_floor.py``, rows ``aio``,
``sync-32`` and ``bridge-slot-32``). So the balancer keeps its asyncio core — proxy,
interceptors, tunnels, aiolimiter, health, reflection, AdminService, all unchanged — and only
the listener changes: ``SyncListener`` takes the same grpc.aio method handlers a
``grpc.aio.server`` would, and ``bridged`` turns each into a synchronous one.

A bridged call: the pool thread (grpc's) schedules the coroutine as a task on the loop
(``call_soon_threadsafe``), and waits on a lock the task's end releases; the coroutine sees an
``_AioContext``, which is grpc.aio's ``ServicerContext`` as far as the proxy uses it. The
client going away (or its deadline) cancels the task, as grpc.aio does. Streams: responses
cross to the pool thread one at a time (the task waits until the previous one was taken, so
a slow reader holds back the replica, not the balancer's memory); requests are read by a
thread of a reader pool, one read at a time, a read the loop stopped waiting for kept for the
next.

Each call holds a pool thread for as long as it lasts, so the pools are as large as the
budgets let calls be in flight (``pool_sizes``): a call over a budget is refused by the
budget, at once, never left waiting for a thread. Threads start on demand."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc

from hashmesh.balancer.budgets import RETRY_AFTER, BudgetSettings, OverBudget
from hashmesh.core.errors import to_grpc_status
from hashmesh.core.handlers import Handler

log = logging.getLogger(__name__)

SyncContext = Any
"""grpcio's synchronous ``ServicerContext`` (its stubs lack ``code()``, which it has)."""

_END = object()
"""The end of a request or response stream, as it crosses between threads."""
_NO_DEADLINE = 1e8
"""Seconds above which grpc's synchronous ``time_remaining`` means "no deadline"."""
SPARE_THREADS = 64
"""Threads beyond the budgets, for calls the budgets do not count (health, reflection's
first messages, AdminService, refusals)."""
PEER_BUDGET_EXCEEDED = "PEER_BUDGET_EXCEEDED"
"""The reason of ``balancer.budgets``' per-peer refusals, which this one is (documented in
``core/catalogue.py``)."""
MAX_WRAPPED = 1024
"""Most bridged handlers kept; beyond it (a client inventing method names) each call wraps its
own, as the router does not keep such handlers either."""


def waiting_per_address(budgets: BudgetSettings) -> int:
    """Calls one address may have waiting for their request message: its budget of unary
    calls (its calls in flight, which each wait there for a moment, are never more), but at
    most a quarter of the smaller pool."""
    unary, streams, _ = pool_sizes(budgets)
    return max(1, min(budgets.peer_calls, min(unary, streams) // 4))


def pool_sizes(budgets: BudgetSettings) -> tuple[int, int, int]:
    """Threads for unary-answer calls, for response streams, and for reading request streams:
    what the budgets allow in flight, plus ``SPARE_THREADS``."""
    unary = budgets.total_calls + budgets.total_upload_streams + SPARE_THREADS
    streams = budgets.total_watch_streams + budgets.total_other_streams + SPARE_THREADS
    readers = budgets.total_upload_streams + budgets.total_other_streams + SPARE_THREADS
    return unary, streams, readers


class _AioContext:
    """What a grpc.aio handler of ours calls on its context, over grpc's synchronous one.

    Runs on the loop; the synchronous context's methods used here take its lock and return
    (none waits for the network), so they are safe from the loop's thread."""

    __slots__ = (
        "_callbacks",
        "_context",
        "_loop",
        "_responses",
        "abort_code",
        "abort_details",
        "ended",
        "gone",
        "task",
    )

    def __init__(
        self,
        context: SyncContext,
        loop: asyncio.AbstractEventLoop,
        responses: queue.SimpleQueue[Any] | None = None,
    ) -> None:
        self._context = context
        self._loop = loop
        self._callbacks: list[Callable[[Any], None]] | None = None
        self._responses = responses
        self.abort_code: grpc.StatusCode | None = None
        self.abort_details = ""
        self.task: asyncio.Task[Any] | None = None
        self.ended = False
        self.gone = False

    # -- what grpc.aio's ServicerContext offers, as far as our handlers use it -----------------

    def peer(self) -> str:
        peer: str = self._context.peer()
        return peer

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def time_remaining(self) -> float | None:
        remaining: float = self._context.time_remaining()
        return None if remaining > _NO_DEADLINE else remaining

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def peer_identities(self) -> Any:
        return self._context.peer_identities()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self._context.send_initial_metadata(metadata)

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self._context.set_trailing_metadata(metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def code(self) -> Any:
        return self.abort_code if self.abort_code is not None else self._context.code()

    def cancelled(self) -> bool:
        return self.ended and not self._context.is_active()

    def done(self) -> bool:
        return self.ended

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if trailing_metadata:
            self._context.set_trailing_metadata(tuple(trailing_metadata))
        self.abort_code = code
        self.abort_details = details
        raise grpc.aio.AbortError()

    async def write(self, message: Any) -> None:
        """A response-streaming handler's message: waits until the pool thread took it."""
        assert self._responses is not None
        taken = self._loop.create_future()
        self._responses.put((message, taken))
        await taken

    # -- the bridge's own ----------------------------------------------------------------------

    def finish(self) -> None:
        """On the loop, as the task ends: the done callbacks, as grpc.aio runs them."""
        self.ended = True
        callbacks, self._callbacks = self._callbacks, None
        if callbacks:
            for callback in callbacks:
                try:
                    callback(self)
                except Exception:
                    log.exception("a call's done callback failed")

    def terminated(self) -> None:
        """grpc's callback when the call is over (any thread): a task still running is the
        client gone or its deadline passed, and is cancelled as grpc.aio cancels it."""
        self.gone = True  # before reading ``task``: ``started`` reads them the other way round
        task = self.task
        if not self.ended and task is not None:
            self._loop.call_soon_threadsafe(task.cancel)

    def started(self, task: asyncio.Task[Any]) -> None:
        """On the loop: the call's task exists; cancelled at once if the call is over already."""
        self.task = task
        if self.gone:
            task.cancel()

    def watch(self, context: SyncContext) -> None:
        """On the pool thread: ``terminated`` when the call ends (now, if it has)."""
        if not context.add_callback(self.terminated):
            self.terminated()

    def answer(self, context: SyncContext, task: asyncio.Task[Any]) -> Any:
        """On the pool thread, once ``task`` ended: its result, or the status it ended with.

        The task's exception is always retrieved (asyncio would log it as never retrieved)
        and the references between task, exception and this context dropped: a cycle would
        keep grpc's call, and with it an HTTP/2 stream of the connection's
        ``max_concurrent_streams``, until the cyclic garbage collector runs."""
        self.task = None
        cancelled = task.cancelled()
        error = None if cancelled else task.exception()
        if error is not None:
            if self.abort_code is None:
                log.error("unexpected error in a call", exc_info=error)
            error.__traceback__ = None
        if self.abort_code is not None:
            context.abort(self.abort_code, self.abort_details)  # raises
        if cancelled:
            context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
        if error is not None:
            context.abort(grpc.StatusCode.UNKNOWN, f"Unexpected {type(error)}: {error}")
        return task.result()


class _Requests:
    """A synchronous request iterator as an async one: each read on a reader thread. A read
    the loop stopped waiting for (a cancelled pump) is kept and its message given to the next
    ``__anext__``, so no message is lost between two readers."""

    def __init__(
        self, requests: Iterator[Any], loop: asyncio.AbstractEventLoop, pool: futures.Executor
    ) -> None:
        self._requests = requests
        self._loop = loop
        self._pool = pool
        self._pending: asyncio.Future[Any] | None = None

    def _read(self) -> Any:
        try:
            return next(self._requests)
        except StopIteration:
            return _END
        except grpc.RpcError:  # the client went away: the task is cancelled as well
            return _END

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        if self._pending is None:
            self._pending = self._loop.run_in_executor(self._pool, self._read)
        message = await asyncio.shield(self._pending)
        self._pending = None
        if message is _END:
            raise StopAsyncIteration
        return message


class Waiting:
    """Pool threads waiting for a call's one request message, counted per address: one
    address may have at most ``per_address`` waiting (more are refused at once with
    RESOURCE_EXHAUSTED), so a client that opens calls and never sends their message cannot
    take the pool's threads from the others. Addresses with nobody waiting are forgotten."""

    def __init__(self, per_address: int) -> None:
        self._per_address = per_address
        self._lock = threading.Lock()
        self._by_address: dict[str, int] = {}

    def first(self, requests: Iterator[Any], context: SyncContext) -> Any:
        """The call's request message, read on this (pool) thread; aborts the call when the
        address has too many waiting already, or the client sent no message."""
        address = context.peer().rsplit(":", 1)[0]
        with self._lock:
            held = self._by_address.get(address, 0)
            if held >= self._per_address:
                refused = True
            else:
                refused = False
                self._by_address[address] = held + 1
        if refused:
            context.abort_with_status(
                to_grpc_status(
                    OverBudget(
                        f"{self._per_address} calls from this address are waiting for their "
                        "request message already",
                        retry_after=RETRY_AFTER,
                        reason=PEER_BUDGET_EXCEEDED,
                    )
                )
            )
        try:
            message = next(requests, _END)
        except grpc.RpcError:  # the client went away meanwhile
            message = _END
        finally:
            with self._lock:
                left = self._by_address[address] - 1
                if left:
                    self._by_address[address] = left
                else:
                    del self._by_address[address]
        if message is _END:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "the call requires exactly one request message"
            )
        return message

    def __len__(self) -> int:
        with self._lock:
            return sum(self._by_address.values())


class Bridge:
    """Turns grpc.aio method handlers into synchronous ones whose behaviour runs on ``loop``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        streams: futures.ThreadPoolExecutor,
        readers: futures.ThreadPoolExecutor,
        waiting: Waiting,
    ) -> None:
        self._loop = loop
        self._streams = streams
        self._readers = readers
        self._waiting = waiting
        self._wrapped: dict[int, tuple[Handler, Handler]] = {}

    def __call__(self, handler: Handler) -> Handler:
        kept = self._wrapped.get(id(handler))
        if kept is not None and kept[0] is handler:
            return kept[1]
        wrapped = self._wrap(handler)
        if len(self._wrapped) < MAX_WRAPPED:
            self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Handler) -> Handler:
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        # Calls with one request are served as request streams (the same on the wire): grpc
        # would otherwise wait for that message on a pool thread before any code of ours runs,
        # and a client that never sends it would hold the thread (``Waiting``).
        if not handler.request_streaming and not handler.response_streaming:
            behaviour = self._unary(handler.unary_unary)
            return grpc.stream_unary_rpc_method_handler(behaviour, **options)
        if handler.request_streaming and not handler.response_streaming:
            behaviour = self._unary(handler.stream_unary, streamed=True)
            return grpc.stream_unary_rpc_method_handler(behaviour, **options)
        if handler.request_streaming:
            behaviour = self._streaming(handler.stream_stream, streamed=True)
            return grpc.stream_stream_rpc_method_handler(behaviour, **options)
        behaviour = self._streaming(handler.unary_stream)
        return grpc.stream_stream_rpc_method_handler(behaviour, **options)

    def _unary(self, behaviour: Any, *, streamed: bool = False) -> Callable[[Any, Any], Any]:
        """A call with one answer: the pool thread waits for the task (the hot path)."""
        loop = self._loop
        readers = self._readers

        waiting = self._waiting

        def bridged(requests: Iterator[Any], context: SyncContext) -> Any:
            argument = (
                _Requests(requests, loop, readers) if streamed else waiting.first(requests, context)
            )
            call = _AioContext(context, loop)
            done = threading.Lock()
            done.acquire()
            box: list[asyncio.Task[Any]] = []

            def ended(task: asyncio.Task[Any]) -> None:
                call.finish()
                done.release()

            def begin() -> None:
                task = loop.create_task(behaviour(argument, call))
                box.append(task)
                task.add_done_callback(ended)
                call.started(task)

            loop.call_soon_threadsafe(begin)
            call.watch(context)
            done.acquire()
            return call.answer(context, box[0])

        if streamed:  # held for a whole upload: on the streams' pool
            bridged.experimental_thread_pool = self._streams  # type: ignore[attr-defined]
        return bridged

    def _streaming(self, behaviour: Any, *, streamed: bool = False) -> Callable[[Any, Any], Any]:
        """A response stream: messages cross one at a time; the task's end is the status."""
        loop = self._loop
        readers = self._readers

        waiting = self._waiting

        def bridged(requests: Iterator[Any], context: SyncContext) -> Iterator[Any]:
            argument = (
                _Requests(requests, loop, readers) if streamed else waiting.first(requests, context)
            )
            responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
            call = _AioContext(context, loop, responses)
            box: list[asyncio.Task[Any]] = []

            async def run() -> None:
                produced = behaviour(argument, call)
                if hasattr(produced, "__aiter__"):  # an async generator
                    async for message in produced:
                        await call.write(message)
                else:  # a coroutine that writes (grpc.aio's health Watch)
                    await produced

            def ended(task: asyncio.Task[Any]) -> None:
                if not task.cancelled():
                    task.exception()  # retrieved here: the pool thread may have stopped reading
                call.finish()
                responses.put(_END)

            def begin() -> None:
                task = loop.create_task(run())
                box.append(task)
                task.add_done_callback(ended)
                call.started(task)

            loop.call_soon_threadsafe(begin)
            call.watch(context)
            try:
                while True:
                    item = responses.get()
                    if item is _END:
                        break
                    message, taken = item
                    loop.call_soon_threadsafe(_taken, taken)
                    yield message
            except GeneratorExit:  # grpc stopped iterating: the call is over
                call.terminated()
                raise
            call.answer(context, box[0])

        bridged.experimental_thread_pool = self._streams  # type: ignore[attr-defined]
        return bridged


def _taken(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Registered(grpc.GenericRpcHandler):
    """Handlers registered by service name (what generated ``add_*_to_server`` code does)."""

    def __init__(self, service: str, handlers: dict[str, Handler]) -> None:
        self._handlers = {f"/{service}/{name}": h for name, h in handlers.items()}

    def service(self, details: grpc.HandlerCallDetails) -> Handler | None:
        return self._handlers.get(details.method)


class _Bridged(grpc.GenericRpcHandler):
    """The listener's one generic handler: the first of ``handlers`` that knows the method,
    bridged."""

    def __init__(self, handlers: list[grpc.GenericRpcHandler], bridge: Bridge) -> None:
        self._handlers = handlers
        self._bridge = bridge

    def service(self, details: grpc.HandlerCallDetails) -> Handler | None:
        for generic in self._handlers:
            handler = generic.service(details)
            if handler is not None:
                return self._bridge(handler)
        return None


class SyncListener:
    """grpcio's synchronous server taking grpc.aio handlers (``add_generic_rpc_handlers``,
    ``add_registered_method_handlers``: what ``add_*Servicer_to_server`` and reflection call),
    with the ``add_*_port``/``start``/``stop`` of a ``grpc.aio.server``. ``start`` runs on the
    loop the handlers will run on."""

    def __init__(self, options: Sequence[tuple[str, Any]], budgets: BudgetSettings) -> None:
        unary, streams, readers = pool_sizes(budgets)
        self._pools = (
            futures.ThreadPoolExecutor(unary, thread_name_prefix="balancer-call"),
            futures.ThreadPoolExecutor(streams, thread_name_prefix="balancer-stream"),
            futures.ThreadPoolExecutor(readers, thread_name_prefix="balancer-read"),
        )
        self._handlers: list[grpc.GenericRpcHandler] = []
        self.waiting = Waiting(waiting_per_address(budgets))
        self._server = grpc.server(
            self._pools[0],
            options=list(options),
            maximum_concurrent_rpcs=None,
        )

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self._handlers.append(_Registered(service, handlers))

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, credentials)

    async def start(self) -> None:
        bridge = Bridge(asyncio.get_running_loop(), self._pools[1], self._pools[2], self.waiting)
        self._server.add_generic_rpc_handlers([_Bridged(self._handlers, bridge)])
        self._server.start()

    async def stop(self, grace: float | None) -> None:
        """Refuses new calls, lets those in flight finish for ``grace`` seconds (the loop runs
        meanwhile: they need it), then cancels the rest."""
        stopped = self._server.stop(grace)
        await asyncio.to_thread(stopped.wait)
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
