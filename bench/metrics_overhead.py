"""Cost of MetricsInterceptor on a unary call: one grpc.aio GrpcServer with it, one without,
called alternately over loopback in the same process; prints the ratio of mean latencies.

    python bench/metrics_overhead.py [calls-per-round] [rounds]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

import grpc

from hashmesh.core.metrics import MetricsInterceptor
from hashmesh.core.rpc import GrpcServer
from hashmesh.v1 import hash_pb2, hash_pb2_grpc


class Echo(hash_pb2_grpc.HashServiceServicer):
    async def Hash(self, request: hash_pb2.HashRequest, context: Any) -> hash_pb2.HashResponse:
        return hash_pb2.HashResponse()


async def start(interceptors: list[Any]) -> GrpcServer:
    server = GrpcServer("127.0.0.1:0", interceptors=interceptors)
    server.add(hash_pb2_grpc.add_HashServiceServicer_to_server, "hashmesh.v1.HashService", Echo())
    await server.start()
    return server


async def round_trip(stub: Any, calls: int) -> float:
    request = hash_pb2.HashRequest(data=b"x")
    started = time.perf_counter()
    for _ in range(calls):
        await stub.ComputeHash(request, timeout=5)
    return (time.perf_counter() - started) / calls


async def main(calls: int, rounds: int) -> None:
    plain, metered = await start([]), await start([MetricsInterceptor()])
    try:
        async with (
            grpc.aio.insecure_channel(plain.address) as a,
            grpc.aio.insecure_channel(metered.address) as b,
        ):
            stubs = {
                "plain": hash_pb2_grpc.HashServiceStub(a),
                "metered": hash_pb2_grpc.HashServiceStub(b),
            }
            for stub in stubs.values():
                await round_trip(stub, 200)  # warm-up
            results: dict[str, list[float]] = {"plain": [], "metered": []}
            for _ in range(rounds):
                for name, stub in stubs.items():
                    results[name].append(await round_trip(stub, calls))
    finally:
        await plain.stop(0)
        await metered.stop(0)
    p, m = statistics.median(results["plain"]), statistics.median(results["metered"])
    print(
        f"plain {p * 1e6:.0f} us/call, with MetricsInterceptor {m * 1e6:.0f} us/call, "
        f"ratio {m / p:.3f} (median of {rounds} rounds x {calls} calls)"
    )


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    asyncio.run(main(*(args or [2000, 5])))
