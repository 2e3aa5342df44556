"""The synchronous listener (``balancer.sync_server``) in process: grpc.aio handlers of all four
kinds answered through grpcio's synchronous server, with a grpc.aio client on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from hashmesh.balancer.budgets import BudgetSettings
from hashmesh.balancer.sync_server import SyncListener, pool_sizes

Ctx = Any
WAIT = 20.0  # bounded waits for a state, never for a speed


class Handlers(grpc.GenericRpcHandler):
    """Raw-bytes handlers of every kind, recording what the server side saw."""

    def __init__(self) -> None:
        self.done_callbacks = 0
        self.cancelled = asyncio.Event()
        self.remaining: list[float | None] = []
        self.peers: list[str] = []

    async def unary(self, request: bytes, context: Ctx) -> bytes:
        self.remaining.append(context.time_remaining())
        self.peers.append(context.peer())
        context.add_done_callback(lambda _: self._done())
        if request == b"abort":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "refused",
                trailing_metadata=(("why-bin", b"\x00\x01"),),
            )
        if request == b"hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request == b"boom":
            raise RuntimeError("boom")
        await context.send_initial_metadata((("head", "h"),))
        context.set_trailing_metadata((("tail", "t"),))
        return request.upper()

    def _done(self) -> None:
        self.done_callbacks += 1

    async def watch(self, request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        for index in range(int(request)):
            yield b"%d" % index
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, "no more")

    async def written(self, request: bytes, context: Ctx) -> None:
        await context.write(b"first")  # grpc.aio's other way of streaming (health Watch)
        await context.write(request)

    async def upload(self, requests: AsyncIterator[bytes], context: Ctx) -> bytes:
        return b"+".join([message async for message in requests])

    async def echo(self, requests: AsyncIterator[bytes], context: Ctx) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message[::-1]

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        name = details.method.rsplit("/", 1)[-1]
        if name == "Unary":
            return grpc.unary_unary_rpc_method_handler(self.unary)
        if name == "Watch":
            return grpc.unary_stream_rpc_method_handler(self.watch)
        if name == "Written":
            return grpc.unary_stream_rpc_method_handler(self.written)
        if name == "Upload":
            return grpc.stream_unary_rpc_method_handler(self.upload)
        if name == "Echo":
            return grpc.stream_stream_rpc_method_handler(self.echo)
        return None


async def until(condition: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "state not reached"
        await asyncio.sleep(0.01)


def served(test: Callable[[Handlers, grpc.aio.Channel], Awaitable[None]]) -> None:
    async def run() -> None:
        handlers = Handlers()
        listener = SyncListener([], BudgetSettings(total_calls=8, total_watch_streams=8))
        listener.add_generic_rpc_handlers([handlers])
        port = listener.add_insecure_port("127.0.0.1:0")
        await listener.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await test(handlers, channel)
        finally:
            await listener.stop(1)

    asyncio.run(run())


def test_unary_answer_metadata_deadline_and_done_callbacks() -> None:
    async def check(handlers: Handlers, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary("/t.T/Unary")(b"abc", timeout=30)
        assert await call == b"ABC"
        assert ("head", "h") in tuple(await call.initial_metadata())
        assert ("tail", "t") in tuple(await call.trailing_metadata())
        assert await channel.unary_unary("/t.T/Unary")(b"x") == b"X"  # no deadline
        remaining = handlers.remaining
        assert remaining[0] is not None and 0 < remaining[0] <= 30
        assert remaining[1] is None
        assert handlers.peers[0].startswith("ipv4:127.0.0.1:")
        await until(lambda: handlers.done_callbacks == 2)

    served(check)


def test_abort_keeps_code_details_and_binary_trailers_and_errors_are_unknown() -> None:
    async def check(handlers: Handlers, channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary("/t.T/Unary")(b"abort")
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details() == "refused"
        assert ("why-bin", b"\x00\x01") in tuple(refused.value.trailing_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary("/t.T/Unary")(b"boom")
        assert failed.value.code() is grpc.StatusCode.UNKNOWN
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await channel.unary_unary("/t.T/Missing")(b"")
        assert missing.value.code() is grpc.StatusCode.UNIMPLEMENTED

    served(check)


def test_a_client_going_away_cancels_the_handler_and_runs_its_done_callback() -> None:
    async def check(handlers: Handlers, channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await channel.unary_unary("/t.T/Unary")(b"hang", timeout=0.5)
        assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(handlers.cancelled.wait(), WAIT)
        handlers.cancelled.clear()
        call = channel.unary_unary("/t.T/Unary")(b"hang")
        await until(lambda: len(handlers.remaining) == 2)
        call.cancel()
        await asyncio.wait_for(handlers.cancelled.wait(), WAIT)
        await until(lambda: handlers.done_callbacks == 2)

    served(check)


def test_streams_of_every_kind_keep_order_and_status() -> None:
    async def check(handlers: Handlers, channel: grpc.aio.Channel) -> None:
        watch = channel.unary_stream("/t.T/Watch")(b"3")
        assert [await watch.read() for _ in range(3)] == [b"0", b"1", b"2"]
        with pytest.raises(grpc.aio.AioRpcError):
            await watch.read()
        assert await watch.code() is grpc.StatusCode.OUT_OF_RANGE
        assert await watch.details() == "no more"
        written = channel.unary_stream("/t.T/Written")(b"second")
        assert [message async for message in written] == [b"first", b"second"]

        async def parts() -> AsyncIterator[bytes]:
            for part in (b"a", b"b", b"c"):
                yield part

        assert await channel.stream_unary("/t.T/Upload")(parts()) == b"a+b+c"
        echo = channel.stream_stream("/t.T/Echo")()
        for message in (b"ab", b"cd"):  # one at a time: each answer before the next request
            await echo.write(message)
            assert await echo.read() == message[::-1]
        await echo.done_writing()
        assert await echo.read() is grpc.aio.EOF
        assert await echo.code() is grpc.StatusCode.OK

    served(check)


def test_pools_are_sized_by_the_budgets_so_a_budget_refuses_before_threads_run_out() -> None:
    unary, streams, readers = pool_sizes(
        BudgetSettings(
            total_calls=100,
            total_upload_streams=10,
            total_watch_streams=20,
            total_other_streams=5,
        )
    )
    assert unary > 100 + 10
    assert streams > 20 + 5
    assert readers > 10 + 5
