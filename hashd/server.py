"""Wiring of one hashd replica: pool, migrations, services, lifecycle."""

from __future__ import annotations

import asyncio
import logging

from hashmesh.core import db, migrations
from hashmesh.core.rpc import GrpcServer, wait_for_signal
from hashmesh.core.tasks.store import PostgresTaskStore
from hashmesh.hashd.config import HashdSettings
from hashmesh.hashd.hash_service import HashService
from hashmesh.hashd.task_service import TaskService
from hashmesh.v1 import hash_pb2, hash_pb2_grpc, task_pb2, task_pb2_grpc

log = logging.getLogger(__name__)


class Hashd:
    """One replica. ``start()`` opens the pool, migrates and serves; ``stop()`` drains."""

    def __init__(self, settings: HashdSettings) -> None:
        self.settings = settings
        self.pool = db.make_pool(settings.database, name="hashd")
        self.grpc = GrpcServer(settings.listen, max_message_bytes=settings.max_message_bytes)
        self.grpc.add(
            hash_pb2_grpc.add_HashServiceServicer_to_server,
            hash_pb2.DESCRIPTOR.services_by_name["HashService"].full_name,
            HashService(),
        )
        self.grpc.add(
            task_pb2_grpc.add_TaskServiceServicer_to_server,
            task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
            TaskService(PostgresTaskStore(self.pool), settings),
        )

    async def start(self) -> None:
        dsn = self.settings.database.require_dsn()
        await asyncio.to_thread(migrations.migrate, dsn)
        await self.pool.open(wait=False)
        await self.grpc.start()
        await self.grpc.set_serving(True)
        log.info("hashd serving", extra={"address": self.grpc.address})

    async def stop(self) -> None:
        await self.grpc.stop(self.settings.grace_seconds)
        await self.pool.close()


async def run(settings: HashdSettings) -> None:
    server = Hashd(settings)
    await server.start()
    print(f"hashd listening on {server.grpc.address}", flush=True)
    try:
        await wait_for_signal()
    finally:
        await server.stop()
