"""Distinct loopback peers for gRPC clients: grpc's Python client cannot choose its source
address, so a test dials a relay that re-connects to the target from 127.0.0.N.

    with SourceRelay("127.0.0.2", balancer_address) as relay:
        channel = grpc.insecure_channel(relay.address)   # the balancer sees peer 127.0.0.2

The relay copies bytes both ways on its own thread and event loop; closing it closes every
connection it holds."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType


class SourceRelay:
    def __init__(self, source: str, target: str) -> None:
        self.source = source
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.address = ""

    def __enter__(self) -> SourceRelay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", 0), self._loop
        ).result(10)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _relay(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            reader, writer = await asyncio.open_connection(
                *self._target, local_addr=(self.source, 0)
            )
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, writer}
        await asyncio.gather(self._pipe(client_reader, writer), self._pipe(reader, client_writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
