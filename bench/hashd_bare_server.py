"""The baseline for bench/hashd_bench.py: a bare grpc.aio server that only answers
HashService.Hash with sha256 (same contract, no interceptors, no health, no cache, no checks).

Run by the bench: ``python bench/hashd_bare_server.py`` prints ``bare listening on HOST:PORT``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal

import grpc

from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc


class BareHash(hash_pb2_grpc.HashServiceServicer):
    async def Hash(
        self, request: hash_pb2.HashRequest, context: grpc.aio.ServicerContext
    ) -> hash_pb2.HashResponse:
        raw = hashlib.sha256(request.data).digest()
        return hash_pb2.HashResponse(
            result=common_pb2.HashResult(
                algorithm=common_pb2.ALGORITHM_SHA256, digest=raw, encoded=raw.hex()
            )
        )


async def main() -> None:
    # HASHD_BARE_INTERCEPTOR=1 adds hashmesh's ErrorInterceptor, to attribute its cost.
    interceptors = []
    if os.environ.get("HASHD_BARE_INTERCEPTOR") == "1":
        from hashmesh.core.rpc import ErrorInterceptor

        interceptors.append(ErrorInterceptor())
    server = grpc.aio.server(interceptors=interceptors)
    hash_pb2_grpc.add_HashServiceServicer_to_server(BareHash(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"bare listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
