"""The inbound floor of a Python gRPC server: a server that answers every unary call itself
(echo, raw bytes, no upstream), grpc.aio on uvloop against grpcio's synchronous server with a
thread pool, and grpc.aio sending initial metadata of its own first (``aio-headers``: what one
more batch per call costs, as the balancer's rate-limit fields did on every answer and still do
near exhaustion or with ``HASHMESH_BALANCER_RATELIMIT_HEADERS=always``), and the synchronous server
whose answer is computed by a coroutine on an asyncio (uvloop) loop in another thread, as the
balancer's synchronous listener does (``balancer.sync_server``): through
``run_coroutine_threadsafe`` (``bridge-future-N``), ``call_soon_threadsafe`` and a lock the
pool thread waits on (``bridge-slot-N``, the balancer's way), or a non-blocking response stream
the loop finishes itself through grpc's private ``_server._status`` (``bridge-nonblocking-N``:
no thread waits; measured, not used). N is the pool's threads. Each on grpc's iomgr transport
or the EventEngine (``--transports``, ``core.grpc_transport``), rounds interleaved. CPU per
call of the server process (from /proc), one client at 32 in flight.

    python bench/inbound_floor.py [--calls 15000] [--rounds 3] [--servers aio,sync-4,...]
        [--transports iomgr,event_engine]

It bounds what any balancer built on that server can cost per call: the balancer's figure in
``bench/balancer_bench.py`` minus this is what forwarding and features cost."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

from hashmesh.core import grpc_transport

if __name__ == "__main__":  # the server's transport, chosen before grpc loads
    grpc_transport.configure(os.environ)

import grpc

TICKS = os.sysconf("SC_CLK_TCK")
SERVERS = (
    "aio",
    "aio-headers",
    "sync-4",
    "sync-32",
    "bridge-future-32",
    "bridge-slot-32",
    "bridge-slot-4",
    "bridge-nonblocking-4",
    "bridge-nonblocking-32",
)
TRANSPORTS = ("iomgr", "event_engine")
HEADERS = (("ratelimit-policy", '"default";q=1000000;w=1'), ("ratelimit", '"default";r=999999;t=1'))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _echo_handler(behaviour: object) -> grpc.GenericRpcHandler:
    class Echo(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            if getattr(behaviour, "__name__", "") == "nonblocking":
                # A unary call is one message and a status on the wire: served as a response
                # stream, which grpcio lets a handler answer later, from any thread.
                behaviour.experimental_non_blocking = True  # type: ignore[attr-defined]
                return grpc.unary_stream_rpc_method_handler(behaviour)
            return grpc.unary_unary_rpc_method_handler(behaviour)

    return Echo()


def _bridge(kind: str) -> Callable[[bytes, object], bytes]:
    """A sync handler whose answer is computed by a coroutine on an asyncio (uvloop) loop in a
    thread of its own, as a balancer's asyncio core would: ``run_coroutine_threadsafe``
    (``bridge-future``) or ``call_soon_threadsafe`` and a lock the handler thread waits on
    (``bridge-slot``)."""
    import uvloop

    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def answer(request: bytes) -> bytes:
        return request

    if kind.startswith("bridge-nonblocking"):
        from grpc import _server

        def nonblocking(request: bytes, context: Any, send: object) -> None:
            # The pool thread only hands the call over; the loop sends message and status in
            # one batch (what a unary handler's return does), and no thread waits meanwhile.
            def finished(task: asyncio.Task[bytes]) -> None:
                _server._status(context._rpc_event, context._state, task.result())

            def begin() -> None:
                loop.create_task(answer(request)).add_done_callback(finished)

            loop.call_soon_threadsafe(begin)

        return nonblocking  # type: ignore[return-value]

    if kind.startswith("bridge-future"):

        def by_future(request: bytes, context: object) -> bytes:
            return asyncio.run_coroutine_threadsafe(answer(request), loop).result()

        return by_future

    def by_slot(request: bytes, context: object) -> bytes:
        done = threading.Lock()
        done.acquire()
        slot: list[Any] = []

        def finished(task: asyncio.Task[bytes]) -> None:
            slot.append(task.result())
            done.release()

        def begin() -> None:
            loop.create_task(answer(request)).add_done_callback(finished)

        loop.call_soon_threadsafe(begin)
        done.acquire()
        return slot[0]  # type: ignore[no-any-return]

    return by_slot


def serve(kind: str) -> None:
    if kind.startswith("aio"):
        import uvloop

        headers = kind == "aio-headers"

        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if headers:
                await context.send_initial_metadata(HEADERS)
            return request

        async def run() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers([_echo_handler(echo)])
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            print(port, flush=True)
            await server.wait_for_termination()

        uvloop.run(run())
        return
    threads = int(kind.rsplit("-", 1)[1])
    sync_server = grpc.server(futures.ThreadPoolExecutor(threads))
    behaviour = _bridge(kind) if kind.startswith("bridge") else (lambda request, context: request)
    sync_server.add_generic_rpc_handlers([_echo_handler(behaviour)])
    port = sync_server.add_insecure_port("127.0.0.1:0")
    sync_server.start()
    print(port, flush=True)
    sync_server.wait_for_termination()


async def load(port: int, calls: int, in_flight: int = 32) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/bench.Echo/Echo")
        payload = b"x" * 40
        await call(payload)
        left = [calls]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                await call(payload, timeout=10, metadata=(("x-client-id", "bench"),))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=15_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}"
    )
    parser.add_argument(
        "--transports", default="iomgr", help="comma-separated: iomgr, event_engine"
    )
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    rows = [
        (kind, transport)
        for kind in args.servers.split(",")
        for transport in args.transports.split(",")
    ]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {row: [] for row in rows}
    for index in range(args.rounds):
        # Every other round in reverse, so no server always runs right after another.
        for kind, transport in rows if index % 2 == 0 else rows[::-1]:
            env = {**os.environ, grpc_transport.VARIABLE: transport}
            server = subprocess.Popen(
                [sys.executable, __file__, "--serve", kind],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            try:
                assert server.stdout is not None
                port = int(server.stdout.readline())
                before = cpu_seconds(server.pid)
                rate = asyncio.run(load(port, args.calls))
                results[(kind, transport)].append(
                    ((cpu_seconds(server.pid) - before) / args.calls * 1e6, rate)
                )
            finally:
                server.terminate()
                server.wait(10)
    print(f"# echo server, 40 B, 32 in flight, {args.calls} calls, median of {args.rounds} rounds")
    print(f"{'server':18} {'transport':12} {'CPU us/call':>12} {'calls/s':>9}  per round")
    for (kind, transport), got in results.items():
        rounds = " ".join(f"{r[0]:.0f}" for r in got)
        print(
            f"{kind:18} {transport:12} {statistics.median(r[0] for r in got):>12.0f} "
            f"{statistics.median(r[1] for r in got):>9.0f}  {rounds}"
        )


if __name__ == "__main__":
    main()
