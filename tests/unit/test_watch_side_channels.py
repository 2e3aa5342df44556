"""The watch hub's LISTEN connection also carries the result cache's clears (one connection
per hashd, not two): a clear empties the memory tier of every other process and never passes
for a status change; a reconnection empties it too (a clear may have gone unheard), while the
connection is down it keeps answering; a failing handler does not stop the watches."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hashmesh.core.errors import Unavailable
from hashmesh.core.hashing.cache import CachedResult, CacheSettings, ResultCache
from hashmesh.core.queue.cache_table import CLEAR_CHANNEL
from hashmesh.core.queue.memory import MemoryListener, MemoryTaskStore
from hashmesh.core.queue.model import TaskStatus
from hashmesh.core.queue.store import NOTIFY_STATUS
from hashmesh.hashd.watch import WatchHub
from tests.unit.test_watch_recent import finished_task, notice, until

RESULT = CachedResult(digest=b"\x01", encoded="01")


def with_cache_on_hub(
    body: Callable[[WatchHub, MemoryListener, MemoryTaskStore, ResultCache], Awaitable[None]],
) -> None:
    async def main() -> None:
        store = MemoryTaskStore()
        listener = MemoryListener(store)
        cache = ResultCache(None, CacheSettings(memory_entries=16))
        hub = WatchHub(listener, store, side_channels={CLEAR_CHANNEL: cache.clear_notices()})
        await hub.start()
        try:
            await asyncio.wait_for(body(hub, listener, store, cache), 10)
        finally:
            await hub.stop()

    asyncio.run(main())


def test_a_clear_from_another_process_empties_the_memory_tier_and_is_no_status() -> None:
    async def body(
        hub: WatchHub, listener: MemoryListener, store: MemoryTaskStore, cache: ResultCache
    ) -> None:
        done = await finished_task(store)
        cache.memory.put(b"k" * 32, RESULT)
        with hub.subscribe(done.id) as sub:
            # Our own clear() emptied the tier already: its notification changes nothing.
            listener.notify(CLEAR_CHANNEL, cache.instance)
            listener.notify(NOTIFY_STATUS, notice(done))
            assert await sub.next(5) == (TaskStatus.SUCCEEDED, done)
            assert len(cache.memory) == 1
            # Another replica's clear, in the same batch as a status change: both arrive, and
            # the clear's payload (an instance id) is not taken for a status change.
            listener.notify(CLEAR_CHANNEL, "another-replica")
            listener.notify(NOTIFY_STATUS, notice(done))
            assert await sub.next(5) == (TaskStatus.SUCCEEDED, done)
            assert len(cache.memory) == 0
        assert hub.recent("another-replica", owner=None) is None

    with_cache_on_hub(body)


def test_a_dropped_connection_empties_the_memory_tier_and_watches_go_on() -> None:
    async def body(
        hub: WatchHub, listener: MemoryListener, store: MemoryTaskStore, cache: ResultCache
    ) -> None:
        cache.memory.put(b"k" * 32, RESULT)
        listener.drop()  # a clear may be missed until the hub reconnects
        listener._arrived.set()  # wake the hub, which finds the connection gone
        await until(lambda: len(cache.memory) == 0)  # emptied once the hub is back
        assert listener.connected
        done = await finished_task(store)
        with hub.subscribe(done.id) as sub:
            listener.notify(NOTIFY_STATUS, notice(done))
            assert await sub.next(5) == (TaskStatus.SUCCEEDED, done)

    with_cache_on_hub(body)


class RefusingListener(MemoryListener):
    """A LISTEN connection that cannot be opened again while ``refuse`` is set."""

    refuse = False
    attempts = 0

    async def connect(self) -> None:
        self.attempts += 1
        if self.refuse:
            raise Unavailable("cannot LISTEN", retry_after=1.0, reason="DATABASE_UNAVAILABLE")
        await super().connect()


def test_the_memory_tier_keeps_answering_while_the_connection_is_down() -> None:
    async def main() -> None:
        store = MemoryTaskStore()
        listener = RefusingListener(store)
        cache = ResultCache(None, CacheSettings(memory_entries=16))
        hub = WatchHub(listener, store, side_channels={CLEAR_CHANNEL: cache.clear_notices()})
        await hub.start()
        try:
            cache.memory.put(b"k" * 32, RESULT)
            listener.refuse = True
            listener.drop()
            listener._arrived.set()
            await until(lambda: listener.attempts >= 3)  # the first and two retries, refused
            assert len(cache.memory) == 1  # PostgreSQL is away: hashing still hits memory
            listener.refuse = False
            await until(lambda: len(cache.memory) == 0)  # back: a clear may have been missed
        finally:
            await hub.stop()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_failing_side_channel_handler_does_not_stop_the_watches() -> None:
    class Broken:
        def notified(self, payload: str) -> None:
            raise RuntimeError("a bug")

        def missed(self) -> None:
            raise RuntimeError("a bug")

    async def main() -> None:
        store = MemoryTaskStore()
        listener = MemoryListener(store)
        hub = WatchHub(listener, store, side_channels={CLEAR_CHANNEL: Broken()})
        await hub.start()
        try:
            done = await finished_task(store)
            with hub.subscribe(done.id) as sub:
                listener.notify(CLEAR_CHANNEL, "x")
                listener.notify(NOTIFY_STATUS, notice(done))
                assert await sub.next(5) == (TaskStatus.SUCCEEDED, done)
                listener.drop()
                listener._arrived.set()
                assert await sub.next(5) is None  # resync: read the task
                await until(lambda: listener.connected)
                listener.notify(NOTIFY_STATUS, notice(done))
                assert await sub.next(5) == (TaskStatus.SUCCEEDED, done)
        finally:
            await hub.stop()

    asyncio.run(asyncio.wait_for(main(), 10))
