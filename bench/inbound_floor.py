"""The inbound floor of a Python gRPC server: a server that answers every unary call itself
(echo, raw bytes, no upstream), grpc.aio on uvloop against grpcio's synchronous server with a
thread pool, and grpc.aio sending initial metadata of its own first (``aio-headers``: what one
more batch per call costs, as the balancer's rate-limit fields did on every answer and still do
near exhaustion or with ``HASHMESH_BALANCER_RATELIMIT_HEADERS=always``). CPU per call of the server
process (from /proc), one client at 32 in flight.

    python bench/inbound_floor.py [--calls 15000] [--rounds 3]

It bounds what any balancer built on that server can cost per call: the balancer's figure in
``bench/balancer_bench.py`` minus this is what forwarding and features cost."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc

TICKS = os.sysconf("SC_CLK_TCK")
SERVERS = ("aio", "aio-headers", "sync-4", "sync-32")
HEADERS = (("ratelimit-policy", '"default";q=1000000;w=1'), ("ratelimit", '"default";r=999999;t=1'))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _echo_handler(behaviour: object) -> grpc.GenericRpcHandler:
    class Echo(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(behaviour)

    return Echo()


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
    threads = int(kind.split("-")[1])
    sync_server = grpc.server(futures.ThreadPoolExecutor(threads))
    sync_server.add_generic_rpc_handlers([_echo_handler(lambda request, context: request)])
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
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in SERVERS}
    for _ in range(args.rounds):
        for kind in SERVERS:
            server = subprocess.Popen(
                [sys.executable, __file__, "--serve", kind], stdout=subprocess.PIPE, text=True
            )
            try:
                assert server.stdout is not None
                port = int(server.stdout.readline())
                before = cpu_seconds(server.pid)
                rate = asyncio.run(load(port, args.calls))
                results[kind].append(((cpu_seconds(server.pid) - before) / args.calls * 1e6, rate))
            finally:
                server.terminate()
                server.wait(10)
    print(f"# echo server, 40 B, 32 in flight, {args.calls} calls, median of {args.rounds} rounds")
    print(f"{'server':10} {'CPU us/call':>12} {'calls/s':>9}")
    for kind, rows in results.items():
        print(
            f"{kind:10} {statistics.median(r[0] for r in rows):>12.0f} {statistics.median(r[1] for r in rows):>9.0f}"
        )


if __name__ == "__main__":
    main()
