"""The floor for a Python gRPC proxy: a grpc.aio pass-through with no features at all.

Unary calls go through a unary handler (the fast path); other kinds as bidi streams. Round
robin over the replicas, no metadata forwarding, no stats, no limits. For comparison only:
``python bench/bare_forwarder.py --listen 127.0.0.1:0 --backends a,b``."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

UNARY = {"/hashmesh.v1.HashService/Hash", "/hashmesh.v1.HashService/Verify"}


class Forwarder(grpc.GenericRpcHandler):
    def __init__(self, backends: list[str]) -> None:
        self.channels = [grpc.aio.insecure_channel(b) for b in backends]
        self.turn = itertools.cycle(range(len(self.channels)))

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method in UNARY:
            calls = [c.unary_unary(method) for c in self.channels]

            async def unary(request: bytes, context: grpc.aio.ServicerContext) -> Any:
                return await calls[next(self.turn)](request, timeout=context.time_remaining())

            return grpc.unary_unary_rpc_method_handler(unary)
        streams = [c.stream_stream(method) for c in self.channels]

        async def bidi(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async for reply in streams[next(self.turn)](requests, timeout=context.time_remaining()):
                yield reply

        return grpc.stream_stream_rpc_method_handler(bidi)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--backends", required=True)
    args = parser.parse_args()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([Forwarder(args.backends.split(","))])
    port = server.add_insecure_port(args.listen)
    await server.start()
    print(f"forwarder listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    if os.environ.get("BARE_UVLOOP"):
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        asyncio.run(main())
