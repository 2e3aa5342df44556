"""A test replica for the balancer's tests: HashService and TaskService.WatchTask with
behaviour chosen per call through metadata, and what it saw sent back as metadata.

Run as ``python -m tests.balancer_backends --name b1 [--delay 0.05]``; prints
``testbackend listening on HOST:PORT``. Metadata it reads: ``x-test-sleep`` (seconds before
answering, or between streamed messages), ``x-test-error: rich`` (INVALID_ARGUMENT with
google.rpc.BadRequest and a custom trailer), ``x-test-count`` (WatchTask messages). It sends
back: initial ``x-initial: NAME``; trailing ``x-backend: NAME``, ``x-remaining`` (the deadline
left when the call arrived, or ``none``), ``x-seen-forwarded-for``, ``x-seen-client-id``,
``x-seen-identity`` (the balancer's stamp), ``x-path`` (``tunnel`` or ``call``: how the call reached it).
It prints ``sleeping METHOD`` when a call starts its ``x-test-sleep`` (the call has arrived)
and ``cancelled METHOD`` when a call is cancelled under it."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc

from hashmesh.core.errors import InvalidArgument, to_grpc_status
from hashmesh.core.rpc import GrpcServer
from hashmesh.core.signals import wait_for_signal
from hashmesh.core.tunnel import TunnelContext
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc, task_pb2, task_pb2_grpc


def _meta(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


class Behaviour:
    def __init__(self, name: str, delay: float) -> None:
        self.name = name
        self.delay = delay

    async def begin(self, context: grpc.aio.ServicerContext, method: str) -> dict[str, str]:
        meta = _meta(context)
        remaining = context.time_remaining()
        context.set_trailing_metadata(
            (
                ("x-backend", self.name),
                ("x-remaining", "none" if remaining is None else f"{remaining:.3f}"),
                ("x-seen-forwarded-for", meta.get("x-forwarded-for", "")),
                ("x-seen-client-id", meta.get("x-client-id", "")),
                ("x-seen-identity", meta.get("x-hashmesh-identity", "")),
                ("x-path", "tunnel" if isinstance(context, TunnelContext) else "call"),
            )
        )
        await context.send_initial_metadata((("x-initial", self.name),))
        if meta.get("x-test-error") == "rich":
            status = to_grpc_status(InvalidArgument("data", "rich error on purpose"))
            await context.abort(
                status.code,
                status.details,
                trailing_metadata=(
                    *status.trailing_metadata,
                    ("x-custom", "kept"),
                    ("x-backend", self.name),
                ),
            )
        sleep = float(meta.get("x-test-sleep", "0")) + self.delay
        if sleep and method != "WatchTask":
            print(f"sleeping {method}", flush=True)
            try:
                await asyncio.sleep(sleep)
            except asyncio.CancelledError:
                print(f"cancelled {method}", flush=True)
                raise
        return meta


def _result(data: bytes) -> common_pb2.HashResult:
    digest = hashlib.sha256(data).digest()
    return common_pb2.HashResult(
        algorithm=common_pb2.ALGORITHM_SHA256, digest=digest, encoded=digest.hex()
    )


class TestHashService(hash_pb2_grpc.HashServiceServicer):  # type: ignore[misc]
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour

    async def Hash(
        self, request: hash_pb2.HashRequest, context: grpc.aio.ServicerContext
    ) -> hash_pb2.HashResponse:
        await self.behaviour.begin(context, "Hash")
        return hash_pb2.HashResponse(result=_result(request.data))

    async def HashStream(
        self, requests: AsyncIterator[hash_pb2.HashStreamRequest], context: grpc.aio.ServicerContext
    ) -> hash_pb2.HashStreamResponse:
        await self.behaviour.begin(context, "HashStream")
        data = b""
        async for message in requests:
            data += message.chunk
        return hash_pb2.HashStreamResponse(result=_result(data), total_bytes=len(data))


class TestTaskService(task_pb2_grpc.TaskServiceServicer):  # type: ignore[misc]
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour

    async def WatchTask(
        self, request: task_pb2.WatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[task_pb2.WatchTaskResponse]:
        meta = await self.behaviour.begin(context, "WatchTask")
        sleep = float(meta.get("x-test-sleep", "0"))
        try:
            for index in range(int(meta.get("x-test-count", "3"))):
                yield task_pb2.WatchTaskResponse(task=task_pb2.Task(id=f"{request.id}-{index}"))
                await asyncio.sleep(sleep)
        except asyncio.CancelledError:
            print("cancelled WatchTask", flush=True)
            raise


async def serve(listen: str, name: str, delay: float) -> None:
    behaviour = Behaviour(name, delay)
    server = GrpcServer(listen)
    server.add(
        hash_pb2_grpc.add_HashServiceServicer_to_server,
        "hashmesh.v1.HashService",
        TestHashService(behaviour),
    )
    server.add(
        task_pb2_grpc.add_TaskServiceServicer_to_server,
        "hashmesh.v1.TaskService",
        TestTaskService(behaviour),
    )
    await server.start()
    await server.set_serving(True)
    print(f"testbackend listening on {server.address}", flush=True)
    await wait_for_signal()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--name", default="b")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.name, args.delay))


if __name__ == "__main__":
    main()
