"""The watch hub's notified states, which let a watch start without reading the table: kept
only while watches come, only for a short while, only for the task's own client, and forgotten
whenever changes may have been missed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from typing import Any, TypeVar

from hashmesh.core.queue.memory import MemoryListener, MemoryTaskStore
from hashmesh.core.queue.model import Completion, NewTask, TaskRecord, TaskStatus
from hashmesh.core.queue.store import NOTIFY_STATUS
from hashmesh.hashd.watch import RECENT_MAX, RECENT_SECONDS, WATCHED_LATELY_SECONDS, WatchHub

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def notice(record: TaskRecord) -> str:
    """A status notification as migration 0006's trigger writes it."""
    entry: dict[str, Any] = asdict(record)
    entry["status"] = record.status.value
    entry["result_digest"] = record.result_digest.hex() if record.result_digest else None
    for name in ("created_at", "run_after", "started_at", "finished_at"):
        entry[name] = entry[name].isoformat() if entry[name] else None
    return json.dumps([entry])


async def finished_task(store: MemoryTaskStore, client: str = "alice") -> TaskRecord:
    [sub] = await store.submit_many([NewTask("md5", b"x", client_id=client)])
    [task] = await store.claim("w", 1, 30)
    await store.complete_many([Completion(task.id, task.lease_id, b"\x01", "01")])
    return await store.get(sub.task.id, owner=None)


def with_hub(body: Callable[[WatchHub, MemoryListener, MemoryTaskStore, Clock], Awaitable[T]]) -> T:
    async def main() -> T:
        store, clock = MemoryTaskStore(), Clock()
        listener = MemoryListener(store)
        hub = WatchHub(listener, store, clock=clock)
        await hub.start()
        try:
            return await asyncio.wait_for(body(hub, listener, store, clock), 10)
        finally:
            await hub.stop()

    return asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def delivered(hub: WatchHub, listener: MemoryListener, payload: str) -> None:
    """Send ``payload`` and wait until the hub has taken it (a marker task's state is seen)."""
    listener.notify(NOTIFY_STATUS, payload)
    await until(lambda: not listener._notes)
    await asyncio.sleep(0)  # the hub handles what wait() returned in the same turn


def test_a_watch_starts_from_the_notified_state_of_its_own_clients_task() -> None:
    async def body(
        hub: WatchHub, listener: MemoryListener, store: MemoryTaskStore, clock: Clock
    ) -> None:
        done = await finished_task(store)
        with hub.subscribe("someone-else"):  # watches are coming in
            await delivered(hub, listener, notice(done))
        seen = hub.recent(done.id, owner="alice")
        assert seen is not None and seen.status is done.status and seen.result_encoded == "01"
        assert hub.recent(done.id, owner=None) == seen  # an operator sees every task
        assert hub.recent(done.id, owner="mallory") is None  # read: NOT_FOUND for others
        clock.now += RECENT_SECONDS + 0.1
        assert hub.recent(done.id, owner="alice") is None  # stale: read the table

    with_hub(body)


def test_states_are_kept_only_while_watches_come() -> None:
    async def body(
        hub: WatchHub, listener: MemoryListener, store: MemoryTaskStore, clock: Clock
    ) -> None:
        done = await finished_task(store)
        await delivered(hub, listener, notice(done))
        assert hub.recent(done.id, owner=None) is None  # no watch yet: nothing parsed
        with hub.subscribe(done.id):
            pass
        clock.now += WATCHED_LATELY_SECONDS + 1
        await delivered(hub, listener, notice(done))
        assert hub.recent(done.id, owner=None) is None  # the last watch is too long ago

    with_hub(body)


def test_a_task_notified_without_its_record_or_a_lost_connection_is_read_again() -> None:
    async def body(
        hub: WatchHub, listener: MemoryListener, store: MemoryTaskStore, clock: Clock
    ) -> None:
        first, second = await finished_task(store), await finished_task(store)
        with hub.subscribe("someone-else"):
            await delivered(hub, listener, notice(first))
            await delivered(hub, listener, notice(second))
            # An entry too long to be notified whole: the kept state is no longer the last.
            await delivered(hub, listener, json.dumps([{"id": first.id, "status": "running"}]))
            assert hub.recent(first.id, owner=None) is None
            assert hub.recent(second.id, owner=None) is not None
            listener.drop()  # changes may be missed until the hub reconnects
            listener._arrived.set()  # wake the hub, which finds the connection gone
            await until(lambda: hub.recent(second.id, owner=None) is None)

    with_hub(body)


def test_a_catch_up_replays_the_states_notified_before_the_subscription() -> None:
    """SubmitAndWatchTask learns its task's id only after the insert: what the hub was notified
    of since the catch-up began reaches the subscription first, in order, then live changes."""

    async def body(
        hub: WatchHub, listener: MemoryListener, store: MemoryTaskStore, clock: Clock
    ) -> None:
        done = await finished_task(store)
        pending = replace(done, status=TaskStatus.PENDING, result_encoded=None)
        running = replace(done, status=TaskStatus.RUNNING, result_encoded=None)
        await delivered(hub, listener, notice(pending))  # before: not replayed
        clock.now += 0.001  # after the hub's first connection (which forgets everything)
        with hub.catching_up() as mark:
            await delivered(hub, listener, notice(running))
            await delivered(hub, listener, notice(done))
            with hub.subscribe(done.id, since=mark) as sub:
                replayed = [await sub.next(1), await sub.next(1)]
                assert replayed == [(TaskStatus.RUNNING, running), (TaskStatus.SUCCEEDED, done)]
                await delivered(hub, listener, notice(done))  # live, after the replay
                assert await sub.next(1) == (TaskStatus.SUCCEEDED, done)

    with_hub(body)


def test_a_catch_up_that_may_have_lost_states_asks_for_a_read() -> None:
    async def body(
        hub: WatchHub, listener: MemoryListener, store: MemoryTaskStore, clock: Clock
    ) -> None:
        done = await finished_task(store)
        clock.now += 0.001
        with hub.catching_up() as mark:
            await delivered(hub, listener, notice(done))
            # More tasks notified than the hub keeps: the oldest, ours, is dropped.
            others = [replace(done, id=str(uuid.uuid4())) for _ in range(RECENT_MAX)]
            await delivered(hub, listener, json.dumps([json.loads(notice(o))[0] for o in others]))
            with hub.subscribe(done.id, since=mark) as sub:
                assert await sub.next(1) is None  # read the task
        clock.now += 0.001
        with hub.catching_up() as mark:  # a later catch-up is whole again
            await delivered(hub, listener, notice(done))
            with hub.subscribe(done.id, since=mark) as sub:
                assert await sub.next(1) == (TaskStatus.SUCCEEDED, done)

    with_hub(body)
