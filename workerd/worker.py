"""The worker loop: claim, compute, write back, renew leases, stop gracefully.

Side tasks, all watched with ``asyncio.wait(FIRST_COMPLETED)``:
- ``_listen``: one LISTEN connection; a NOTIFY on ``hashmesh_tasks_ready`` wakes the claimer.
- ``_claim_loop``: claims at most the free slots (bounded prefetch), highest priority first,
  then waits for a wake-up, the next due retry or the slow safety poll.
- ``_flush_loop``: writes results and failures back in batches (whatever accumulated while the
  previous write was in flight), fenced by lease.
- ``_heartbeat_loop``: renews held leases, records liveness, learns of cancellations and lost
  leases.
- ``_reap_loop``: every ``reap_seconds``, puts back tasks whose holder died (its session lock
  vanished with its connection) or stopped renewing its lease; one worker at a time does it.
- ``prune`` (``Pruner.run``): retention (``hashmesh.core.queue.retention``), one elected
  pruner per run.
The LISTEN connection also holds this worker's session lock: claims are stamped with it.
Digest tasks run inline (microseconds); argon2 tasks run in a bounded thread pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from hashmesh.core import metrics
from hashmesh.core.backoff import RECONNECT, STATEMENT
from hashmesh.core.errors import Unavailable
from hashmesh.core.hashing.algorithms import Algorithm, Argon2Params
from hashmesh.core.hashing.cache import CacheSettings, ResultCache
from hashmesh.core.queue import db, migrations
from hashmesh.core.queue.cache_table import PostgresCacheTable
from hashmesh.core.queue.model import (
    ClaimedTask,
    Completion,
    Failure,
    Lease,
    Notifications,
    TaskStore,
)
from hashmesh.core.queue.retention import Pruner
from hashmesh.core.queue.store import NOTIFY_READY, Listener, PostgresTaskStore
from hashmesh.workerd import handlers
from hashmesh.workerd.config import WorkerSettings
from hashmesh.workerd.metrics import WorkerMetrics

log = logging.getLogger(__name__)


@dataclass
class _Held:
    """A claimed task until its outcome is written (or its lease is lost)."""

    task: ClaimedTask
    started: bool = False
    dropped: bool = False
    """Cancelled or lease lost while computing: the outcome is thrown away."""


@dataclass
class WorkerCounters:
    claimed: int = 0
    processed: int = 0
    fenced: int = 0
    handed_back: int = 0
    claims: int = 0
    empty_claims: int = 0
    extra: dict[str, int] = field(default_factory=dict)


@dataclass
class Database:
    """What a worker on PostgreSQL opens at start and closes at the end: the schema
    (migrations) and its pool."""

    dsn: str
    pool: db.Pool

    async def migrate(self) -> None:
        await asyncio.to_thread(migrations.migrate, self.dsn)

    async def open(self) -> None:
        await self.pool.open(wait=False)
        metrics.watch_pool(self.pool)

    async def close(self) -> None:
        await self.pool.close()
        metrics.unwatch_pool(self.pool)


class Worker:
    """One workerd. Constructing it does no I/O; ``run(stop)`` does everything."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        store: TaskStore,
        listener: Notifications,
        cache: ResultCache | None = None,
        database: Database | None = None,
    ) -> None:
        """``store`` and ``listener`` are the queue (``on_postgres`` builds the production
        ones; unit tests pass ``MemoryTaskStore`` and ``MemoryListener``); ``cache`` receives
        the results of deterministic slow tasks; ``database`` is opened by ``start()`` and
        closed at the end."""
        self.settings = settings
        self.name = settings.name
        self.store = store
        self.listener = listener
        self.cache = cache
        self._database = database
        self.pruner = Pruner(self.store, settings.retention)
        self.counters = WorkerCounters()
        self._running: set[asyncio.Task[None]] = set()
        self._held: dict[str, _Held] = {}
        self._done: list[Completion] = []
        self._failed: list[Failure] = []
        self._cancelled: list[Lease] = []
        self._outbox = asyncio.Event()
        self._wake = asyncio.Event()
        self._due_at: float | None = None
        """Loop time at which a waiting task becomes due (announced by NOTIFY)."""
        self._check_due = True
        """Ask the database for the next due time at the next idle wait (start, reconnect,
        after a timer or a safety poll fired): announcements may have been missed."""
        self._slots = asyncio.Event()
        self._claiming = True
        self._cpu = asyncio.Semaphore(settings.cpu_workers)
        self._executor = ThreadPoolExecutor(settings.cpu_workers, thread_name_prefix="workerd-cpu")
        self._fail = frozenset(settings.fail_algorithms)
        self._keys = settings.task_keys
        self.task_metrics = WorkerMetrics()
        # Read at scrape time (another thread): len() of a dict is safe there.
        metrics.WORKER_IN_FLIGHT.set_function(lambda: len(self._held))

    @classmethod
    def on_postgres(cls, settings: WorkerSettings) -> Worker:
        """The production wiring: a small pool of its own, the PostgreSQL store, a LISTEN
        connection holding the worker's session, the shared result cache. No I/O here."""
        dsn = settings.database.require_dsn()
        pool = db.make_pool(
            settings.database,
            name=f"workerd:{settings.name}"[:63],
            max_size=min(4, settings.database.pool_max),
            index_only_plans=True,
        )
        listener = Listener(
            dsn, [NOTIFY_READY], name=f"workerd-listen:{settings.name}"[:63], hold_session=True
        )
        # Results of deterministic slow tasks go into the shared cache, so that the same
        # submission later finishes at once in hashd. workerd only stores: no memory tier,
        # so no LISTEN connection for its clears either, which PostgreSQL would wake at every
        # commit that notifies (three per task).
        cache = ResultCache(
            PostgresCacheTable(pool, dsn=dsn),
            replace(CacheSettings.from_env(), memory_entries=0),
        )
        return cls(
            settings,
            store=PostgresTaskStore(pool),
            listener=listener,
            cache=cache,
            database=Database(dsn, pool),
        )

    @property
    def in_flight(self) -> int:
        return len(self._held)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate, open the pool and the LISTEN connection, register; retried with backoff
        while the database is unreachable."""
        if self._database is not None:
            await _retry_forever(self._database.migrate, what="migrating")
            await self._database.open()
        # The session first: a registered worker without one would look dead to the reaper.
        await _retry_forever(self.listener.connect, what="listening")
        await _retry_forever(
            lambda: self.store.register_worker(
                self.name, socket.gethostname(), os.getpid(), session=self.listener.session
            ),
            what="registering",
        )
        if self.cache is not None:
            await self.cache.start()

    async def _close(self) -> None:
        await self.listener.close()
        if self.cache is not None:
            await self.cache.stop()
        if self._database is not None:
            await self._database.close()

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
        starting = asyncio.create_task(self.start(), name="start")
        stopping = asyncio.create_task(stop.wait(), name="stop-early")
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():  # stopped while still waiting for the database
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await self._close()
            self._executor.shutdown(wait=False)
            return
        starting.result()
        if on_ready is not None:
            on_ready()
        log.info(
            "worker ready", extra={"worker": self.name, "concurrency": self.settings.concurrency}
        )
        loops = {
            "claim": asyncio.create_task(self._claim_loop(), name="claim"),
            "flush": asyncio.create_task(self._flush_loop(), name="flush"),
            "heartbeat": asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            "listen": asyncio.create_task(self._listen_loop(), name="listen"),
            "reap": asyncio.create_task(self._reap_loop(), name="reap"),
        }
        if self.pruner.enabled:
            loops["prune"] = asyncio.create_task(self.pruner.run(), name="prune")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait(
                [stopper, *loops.values()], return_when=asyncio.FIRST_COMPLETED
            )
            crashed = [
                t
                for t in done
                if t is not stopper and not t.cancelled() and t.exception() is not None
            ]
            for task in crashed:
                log.error(
                    "worker loop crashed",
                    exc_info=task.exception(),
                    extra={"loop": task.get_name()},
                )
            await self._shutdown(loops)
            if crashed:
                # Exit non-zero so a supervisor restarts us; unfinished leases expire and retry.
                raise RuntimeError(f"worker loop {crashed[0].get_name()!r} crashed") from crashed[
                    0
                ].exception()
        finally:
            stopper.cancel()
            for task in loops.values():
                task.cancel()
            await asyncio.gather(*loops.values(), return_exceptions=True)
            await self._close()
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self, loops: dict[str, asyncio.Task[None]]) -> None:
        """Stop claiming; hand back what never started; let the rest finish within the grace
        period; write outcomes; hand back whatever is still unfinished."""
        self._claiming = False
        self._wake.set()
        self._slots.set()
        with contextlib.suppress(Exception):  # timed out, or crashed (already logged)
            await asyncio.wait_for(
                asyncio.shield(loops["claim"]), timeout=self.settings.grace_seconds
            )
        await self._hand_back([h for h in self._held.values() if not h.started])
        deadline = asyncio.get_running_loop().time() + self.settings.grace_seconds
        while self._held and asyncio.get_running_loop().time() < deadline:
            self._outbox.set()
            await asyncio.sleep(0.02)
        await self._hand_back([h for h in self._held.values() if not h.dropped])
        with contextlib.suppress(Unavailable):
            await self.store.unregister_worker(self.name, self.counters.processed)
        log.info(
            "worker stopped",
            extra={
                "worker": self.name,
                "processed": self.counters.processed,
                "handed_back": self.counters.handed_back,
            },
        )

    async def _hand_back(self, held: list[_Held]) -> None:
        if not held:
            return
        for item in held:
            item.dropped = True
        leases = [Lease(h.task.id, h.task.lease_id) for h in held]
        try:
            released = await self.store.release(leases)
        except Unavailable:
            log.warning(
                "could not hand back tasks; their leases will expire", extra={"tasks": len(leases)}
            )
            return
        self.counters.handed_back += len(released)
        for item in held:
            self._held.pop(item.task.id, None)

    # -- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        failures = 0
        while self._claiming:
            free = self.settings.concurrency - len(self._held)
            if free <= 0:
                self._slots.clear()
                await self._slots.wait()
                continue
            self._wake.clear()
            try:
                claimed = await self.store.claim(
                    self.name, free, self.settings.lease_seconds, session=self.listener.session
                )
                failures = 0
            except Unavailable as exc:
                failures += 1
                delay = STATEMENT.delay(failures)
                log.warning(
                    "claim failed; retrying",
                    extra={"reason": exc.message, "delay_s": round(delay, 3)},
                )
                await asyncio.sleep(delay)
                continue
            self.counters.claims += 1
            if not self._claiming:
                # Stopped while the claim was in flight: these never start.
                for task in claimed:
                    self._held[task.id] = _Held(task)
                await self._hand_back([self._held[t.id] for t in claimed])
                return
            self.task_metrics.claimed(claimed)
            for task in claimed:
                self._dispatch(task)
            if len(claimed) == free or self._wake.is_set():
                continue
            # Fewer than asked for: nothing else was due when the claim ran, and whatever
            # became due since has sent a NOTIFY (the wake-up was cleared before claiming).
            if not claimed:
                self.counters.empty_claims += 1
            await self._idle()

    async def _idle(self) -> None:
        """Wait for a NOTIFY, the next due retry, or the safety poll, whichever comes first."""
        loop = asyncio.get_running_loop()
        if self._check_due:
            self._check_due = False
            with contextlib.suppress(Unavailable):
                due = await self.store.next_due()
                if due is not None:
                    self._note_due(loop.time() + max(due, 0.0))
        if self._wake.is_set() or not self._claiming:
            return
        timeout = self.settings.poll_seconds
        if self._due_at is not None:
            timeout = min(timeout, max(0.0, self._due_at - loop.time()) + 0.005)
        try:
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                await self._wake.wait()
        except TimeoutError:
            # A timer or the safety poll fired: claim, then look at what waits next.
            self._due_at = None
            self._check_due = True

    def _note_due(self, at: float) -> None:
        if self._due_at is None or at < self._due_at:
            self._due_at = at
            self._wake.set()  # re-arm the idle wait with the earlier timer

    def _on_ready(self, payload: str) -> None:
        """``''``: work is due now; an epoch: work becomes due then."""
        if not payload:
            self._wake.set()
            return
        with contextlib.suppress(ValueError):
            delay = float(payload) - time.time()
            self._note_due(asyncio.get_running_loop().time() + max(0.0, delay))

    async def _listen_loop(self) -> None:
        failures = 0
        while True:
            try:
                if not self.listener.connected:
                    await self.listener.connect()
                    failures = 0
                    if self.listener.session is not None:
                        with contextlib.suppress(Unavailable):
                            await self.store.set_worker_session(self.name, self.listener.session)
                    self._check_due = True  # notifications may have been missed meanwhile
                    self._wake.set()
                for _, payload in await self.listener.wait(timeout=self.settings.poll_seconds):
                    self._on_ready(payload)
            except Unavailable as exc:
                failures += 1
                delay = RECONNECT.delay(failures)
                log.warning("LISTEN connection lost; reconnecting", extra={"reason": exc.message})
                await asyncio.sleep(delay)

    # -- computing ---------------------------------------------------------------------------

    def _dispatch(self, task: ClaimedTask) -> None:
        self.counters.claimed += 1
        held = _Held(task)
        self._held[task.id] = held
        if task.cancel_requested:
            held.started = True
            self._cancelled.append(Lease(task.id, task.lease_id))
            self._outbox.set()
        elif handlers.is_cpu_heavy(task.algorithm):
            running = asyncio.get_running_loop().create_task(self._run_heavy(held))
            self._running.add(running)  # the loop keeps only a weak reference
            running.add_done_callback(self._running.discard)
        else:
            held.started = True
            self._compute_now(held)

    def _compute_now(self, held: _Held) -> None:
        task = held.task
        try:
            digest, encoded = handlers.run(task, self._keys, fail=self._fail)
        except Exception as exc:
            self._record_failure(task, exc)
        else:
            self._done.append(Completion(task.id, task.lease_id, digest, encoded))
        self._outbox.set()

    async def _run_heavy(self, held: _Held) -> None:
        async with self._cpu:
            if held.dropped or not self._claiming:
                return  # handed back or cancelled before it started
            held.started = True
            task = held.task
            loop = asyncio.get_running_loop()
            try:
                digest, encoded = await loop.run_in_executor(
                    self._executor,
                    lambda: handlers.run(task, self._keys, fail=self._fail),
                )
            except Exception as exc:
                if not held.dropped:
                    self._record_failure(task, exc)
            else:
                if not held.dropped:
                    self._done.append(Completion(task.id, task.lease_id, digest, encoded))
            self._outbox.set()

    def _record_failure(self, task: ClaimedTask, exc: BaseException) -> None:
        error = handlers.describe_error(exc)
        log.info(
            "task attempt failed",
            extra={
                "task": task.id,
                "attempt": task.attempts,
                "algorithm": task.algorithm,
                "error_type": type(exc).__name__,
            },
        )
        self._failed.append(Failure(task.id, task.lease_id, error))

    # -- writing back ------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        failures = 0
        while True:
            await self._outbox.wait()
            self._outbox.clear()
            done, self._done = self._done, []
            failed, self._failed = self._failed, []
            cancelled, self._cancelled = self._cancelled, []
            if not (done or failed or cancelled):
                continue
            try:
                # Recorded per statement: after a later one fails, the rewrite of what was
                # already written is fenced and returns nothing.
                completed = await self.store.complete_outcomes(done)
                self.task_metrics.completed(completed)
                recorded = await self.store.fail_outcomes(
                    failed, base=self.settings.retry_base, cap=self.settings.retry_cap
                )
                self.task_metrics.failed(recorded)
                acknowledged = await self.store.acknowledge_cancel(cancelled)
                failures = 0
            except Unavailable as exc:
                # Keep the outcomes and try again: leases outlive short outages, and a result
                # written after its lease expired is refused by fencing anyway.
                self._done[:0], self._failed[:0], self._cancelled[:0] = done, failed, cancelled
                failures += 1
                delay = STATEMENT.delay(failures)
                log.warning(
                    "writing results failed; retrying",
                    extra={"reason": exc.message, "pending": len(done) + len(failed)},
                )
                await asyncio.sleep(delay)
                self._outbox.set()
                continue
            written = {o.id for o in completed}
            finished = [d.id for d in done] + [f.id for f in failed] + [c.id for c in cancelled]
            await self._remember([d for d in done if d.id in written])
            self.counters.fenced += (
                len(done)
                - len(written)
                + len(failed)
                - len(recorded)
                + len(cancelled)
                - len(acknowledged)
            )
            self.counters.processed += len(written) + len(recorded) + len(acknowledged)
            for task_id in finished:
                self._held.pop(task_id, None)
            self._slots.set()

    async def _remember(self, written: list[Completion]) -> None:
        for result in written:
            held = self._held.get(result.id)
            if held is None:
                continue
            algorithm = Algorithm(held.task.algorithm)
            params = (
                Argon2Params.from_json(held.task.params)
                if algorithm is Algorithm.ARGON2ID
                else None
            )
            if self.cache is not None and self.cache.is_cacheable(algorithm, params):
                # Keyed by an HMAC of the clear input (opened again: microseconds), so that
                # hashd's lookups find it; the cache stores no input.
                data = handlers.open_input(held.task, self._keys)
                await self.cache.store(
                    algorithm,
                    params,
                    data,
                    result.digest,
                    result.encoded,
                    tenant=held.task.client_id,
                )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            leases = {
                h.task.id: Lease(h.task.id, h.task.lease_id)
                for h in self._held.values()
                if not h.dropped
            }
            try:
                renewed = await self.store.heartbeat(
                    self.name,
                    list(leases.values()),
                    lease_seconds=self.settings.lease_seconds,
                    in_flight=len(self._held),
                    processed=self.counters.processed,
                )
            except Unavailable as exc:
                log.warning("heartbeat failed", extra={"reason": exc.message})
                continue
            self._apply_heartbeat(leases, renewed)

    async def _reap_loop(self) -> None:
        """At once (a restarted worker rescues its previous self's tasks), then periodically."""
        while True:
            try:
                reclaimed = await self.store.reclaim_lost_outcomes()
            except Unavailable as exc:
                log.warning("reclaiming lost tasks failed", extra={"reason": exc.message})
                reclaimed = []
            if reclaimed:
                self.task_metrics.failed(reclaimed)
                log.info("put back tasks of lost workers", extra={"tasks": len(reclaimed)})
            await asyncio.sleep(self.settings.reap_seconds)

    def _apply_heartbeat(self, sent: dict[str, Lease], renewed: dict[str, bool]) -> None:
        for task_id, lease in sent.items():
            held = self._held.get(task_id)
            if held is None or held.task.lease_id != lease.lease_id:
                continue  # finished meanwhile
            if task_id not in renewed:
                # Lease lost (expired and reclaimed): another worker may run it now.
                held.dropped = True
                self._held.pop(task_id, None)
                self.counters.fenced += 1
                self._slots.set()
            elif renewed[task_id] and not held.dropped:
                held.dropped = True
                self._cancelled.append(lease)
                self._outbox.set()


async def _retry_forever(operation: Callable[[], Awaitable[object]], *, what: str) -> None:
    attempt = 0
    while True:
        try:
            await operation()
            return
        except (Unavailable, OSError, *db.TRANSIENT) as exc:
            attempt += 1
            delay = RECONNECT.delay(attempt)
            log.warning(
                "database not reachable at start-up; retrying",
                extra={"what": what, "error": type(exc).__name__, "delay_s": round(delay, 3)},
            )
            await asyncio.sleep(delay)
