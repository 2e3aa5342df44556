"""The two-tier result cache shared by hashd (HashService, TaskService) and workerd.

Tiers: a bounded in-process LRU (``memory``, one per process) in front of the PostgreSQL table
``hashmesh_cache`` (``shared``, one per mesh). A lookup tries memory, then the table; a hit in
the table is copied into memory. A store writes both.

Stable interface (other modules depend on it)::

    cache = ResultCache(PostgresCacheTable(pool), CacheSettings.from_env())   # no I/O here
    await cache.start()                                    # secret, sweeper, clear listener
    if cache.is_cacheable(algorithm, params):
        hit = await cache.lookup(algorithm, params, data, tenant=caller)  # never raises
        ...
        await cache.store(algorithm, params, data, digest, encoded, tenant=caller)
    await cache.stats() / await cache.clear()
    await cache.stop()

Rules it keeps:
- The key is HMAC-SHA256(secret, tenant, algorithm, parameters, input): no input is stored in
  clear, and without the secret the table cannot be used to test guesses. Values hold only
  outputs. An entry answers only the tenant (caller identity) that made it: shared across
  tenants, a hit would confirm to one tenant what another hashed (a password, given its salt).
- Never caches what is not deterministic (argon2id with a random salt), and only algorithms
  named in ``CacheSettings.algorithms``.
- Fails open: every database step has a short timeout; after a failure the shared tier is
  skipped for a back-off period (a circuit breaker), so hashing answers uncached while
  PostgreSQL is down or slow. Slow lookups are abandoned, not cancelled (cancelling a query
  would cost a connection), and at most ``max_pending`` of them may be outstanding.
- ``clear()`` empties the table and sends ``NOTIFY hashmesh_cache_clear``; every process
  LISTENs on one dedicated connection and empties its memory tier when told.

The shared tier is a ``SharedTable``: ``hashmesh.core.queue.cache_table.PostgresCacheTable``
holds its SQL and borrows connections from the daemon's pool, plus one LISTEN connection per
process when the memory tier is on (``memory_entries > 0``). A process that only stores
(workerd) can turn the memory tier off and save that connection; one that LISTENs anyway
(hashd's watch hub) takes the clear channel onto its connection with ``clear_notices()``
before ``start()``. See the README's "Which algorithms are cached by default".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from hashmesh.core import metrics
from hashmesh.core.backoff import RECONNECT, backoff_delay
from hashmesh.core.errors import Unavailable
from hashmesh.core.hashing.algorithms import Algorithm, Argon2Params
from hashmesh.core.settings import SettingsError, env_float, env_int, env_list, env_str

log = logging.getLogger(__name__)

T = TypeVar("T")

_KEY_DOMAIN = b"hashmesh-cache-v2\x00"
LISTEN_WAIT_SECONDS = 60.0
"""Longest one wait of the clear listener; a lost connection ends it at once anyway."""


class ClearListener(Protocol):
    """A LISTEN connection on the clear channel (``hashmesh.core.queue.store.Listener``)."""

    async def connect(self) -> None: ...
    async def wait(self, timeout: float) -> list[tuple[str, str]]: ...
    async def close(self) -> None: ...


class SharedTable(Protocol):
    """Where the shared tier keeps its entries and the per-database secret:
    ``hashmesh.core.queue.cache_table.PostgresCacheTable``. Every method raises
    ``Unavailable`` when the database cannot answer."""

    async def lookup(self, key: bytes, *, timeout: float) -> tuple[bytes, float] | None: ...
    async def put(
        self, key: bytes, value: bytes, *, ttl_seconds: float, timeout: float
    ) -> None: ...
    async def count(self, *, timeout: float) -> int: ...
    async def sweep(self, batch: int) -> int: ...
    async def clear(self, sender: str) -> int: ...
    async def secret(self, candidate: bytes) -> bytes: ...
    def clear_listener(self) -> ClearListener | None: ...


@dataclass(frozen=True)
class CacheSettings:
    """How a process uses the result cache. Every process of a mesh must use the same secret
    and algorithms, or they will not find each other's entries."""

    secret: str = ""
    """HMAC key for cache keys (``HASHMESH_CACHE_SECRET``). Empty: a random per-database secret
    is created once in the cache table and shared by every process through it (convenient, but
    then anyone who can read the database can test guesses against the table: set it in
    production)."""
    algorithms: tuple[str, ...] = ("argon2id",)
    """Algorithms whose results are cached (``HASHMESH_CACHE_ALGORITHMS``, comma-separated;
    empty turns the cache off). Default chosen by measurement: see the README's "Which
    algorithms are cached by default"."""
    memory_entries: int = 10_000
    """Bound of the in-process LRU; 0 turns the memory tier off (``HASHMESH_CACHE_MEMORY_ENTRIES``)."""
    ttl_seconds: float = 24 * 3600.0
    """Lifetime of an entry in both tiers (``HASHMESH_CACHE_TTL_SECONDS``)."""
    sweep_seconds: float = 60.0
    """Interval between removals of expired shared rows (``HASHMESH_CACHE_SWEEP_SECONDS``)."""
    timeout_seconds: float = 0.1
    """Longest a lookup or store waits for PostgreSQL before answering without the shared tier
    (``HASHMESH_CACHE_TIMEOUT_MS``, in milliseconds)."""
    breaker_seconds: float = 2.0
    """After a shared-tier failure, seconds the shared tier is skipped; doubles per failure up
    to 30 s with full jitter (``HASHMESH_CACHE_BREAKER_SECONDS``)."""
    max_pending: int = 64
    """Shared-tier operations allowed in flight at once; beyond it the tier is skipped
    (``HASHMESH_CACHE_MAX_PENDING``)."""

    def __post_init__(self) -> None:
        known = {a.value for a in Algorithm}
        unknown = [name for name in self.algorithms if name not in known]
        if unknown:
            raise SettingsError(
                f"HASHMESH_CACHE_ALGORITHMS: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if self.memory_entries < 0 or self.ttl_seconds <= 0 or self.sweep_seconds <= 0:
            raise SettingsError("cache sizes and intervals must be positive")
        if self.timeout_seconds <= 0 or self.max_pending < 1:
            raise SettingsError(
                "HASHMESH_CACHE_TIMEOUT_MS and HASHMESH_CACHE_MAX_PENDING must be positive"
            )

    @classmethod
    def from_env(cls) -> CacheSettings:
        return cls(
            secret=env_str("CACHE_SECRET", ""),
            algorithms=tuple(
                Algorithm.parse(a, field="HASHMESH_CACHE_ALGORITHMS").value
                for a in env_list("CACHE_ALGORITHMS", cls.algorithms)
            ),
            memory_entries=env_int("CACHE_MEMORY_ENTRIES", cls.memory_entries, minimum=0),
            ttl_seconds=env_float("CACHE_TTL_SECONDS", cls.ttl_seconds, minimum=1.0),
            sweep_seconds=env_float("CACHE_SWEEP_SECONDS", cls.sweep_seconds, minimum=0.1),
            timeout_seconds=env_float("CACHE_TIMEOUT_MS", cls.timeout_seconds * 1000, minimum=1.0)
            / 1000,
            breaker_seconds=env_float("CACHE_BREAKER_SECONDS", cls.breaker_seconds, minimum=0.0),
            max_pending=env_int("CACHE_MAX_PENDING", cls.max_pending, minimum=1),
        )


@dataclass(frozen=True)
class CachedResult:
    """A cached output: the raw digest and its printable form (hex or PHC string)."""

    digest: bytes
    encoded: str


@dataclass
class TierStats:
    """Counters of one tier since the process started."""

    hits: int = 0
    misses: int = 0
    entries: int = 0
    evictions: int = 0
    errors: int = 0


@dataclass(frozen=True)
class CacheStats:
    memory: TierStats
    shared: TierStats
    algorithms: tuple[str, ...]


@dataclass(frozen=True)
class ClearResult:
    shared_removed: int
    memory_removed: int


def cache_key(
    secret: bytes, algorithm: Algorithm, params: Argon2Params | None, data: bytes, *, tenant: str
) -> bytes:
    """HMAC-SHA256 over a canonical, unambiguous encoding of (tenant, algorithm, parameters,
    input). Identities hold no NUL; the input comes last, so no choice of input can shift the
    fields before it."""
    mac = hmac.new(secret, _KEY_DOMAIN, hashlib.sha256)
    mac.update(tenant.encode())
    mac.update(b"\x00")
    mac.update(algorithm.value.encode())
    mac.update(b"\x00")
    if params is not None:
        salt = params.salt.hex() if params.salt is not None else "random"
        mac.update(
            f"t={params.time_cost},m={params.memory_cost_kib},p={params.parallelism},"
            f"l={params.hash_len},s={salt}".encode()
        )
    mac.update(b"\x00")
    mac.update(data)
    return mac.digest()


def encode_value(result: CachedResult) -> bytes:
    """One length byte, the digest, then the printable form."""
    return bytes([len(result.digest)]) + result.digest + result.encoded.encode("ascii")


def decode_value(value: bytes) -> CachedResult:
    size = value[0]
    return CachedResult(
        digest=bytes(value[1 : 1 + size]), encoded=bytes(value[1 + size :]).decode("ascii")
    )


class MemoryTier:
    """A bounded LRU with per-entry expiry (monotonic clock). Not thread-safe: event loop only."""

    def __init__(
        self, capacity: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.ttl = ttl_seconds
        self.stats = TierStats()
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[CachedResult, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedResult | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            metrics.MEMORY_CACHE_MISSES.inc()
            return None
        result, expires = entry
        if expires <= self._clock():
            del self._entries[key]
            self.stats.evictions += 1
            self.stats.misses += 1
            metrics.MEMORY_CACHE_MISSES.inc()
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        metrics.MEMORY_CACHE_HITS.inc()
        return result

    def put(self, key: bytes, result: CachedResult, ttl: float | None = None) -> None:
        if self.capacity <= 0:
            return
        life = self.ttl if ttl is None else min(ttl, self.ttl)
        self._entries[key] = (result, self._clock() + life)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def clear(self) -> int:
        removed = len(self._entries)
        self._entries.clear()
        return removed


class SharedTierDown(Exception):
    """The shared tier was skipped or failed; the caller goes on without it."""


@dataclass
class _Breaker:
    """Skip the shared tier for a while after a failure (full-jitter exponential back-off)."""

    base: float
    cap: float = 30.0
    failures: int = 0
    open_until: float = 0.0

    def allows(self) -> bool:
        return time.monotonic() >= self.open_until

    def failed(self) -> None:
        self.failures += 1
        if self.base > 0:
            delay = self.base / 2 + backoff_delay(self.failures - 1, self.base / 2, self.cap)
            self.open_until = time.monotonic() + delay

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = 0.0


@dataclass
class ResultCache:
    """The cache one process uses. Construction does no I/O; ``start()`` / ``stop()`` run the
    background tasks (secret loading, sweeper, clear listener)."""

    table: SharedTable | None
    """The shared tier; ``None`` leaves only the memory tier (tests, tools)."""
    settings: CacheSettings = field(default_factory=CacheSettings)
    memory: MemoryTier = field(init=False)
    shared: TierStats = field(init=False, default_factory=TierStats)
    instance: str = field(init=False, default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.memory = MemoryTier(self.settings.memory_entries, self.settings.ttl_seconds)
        self._algorithms = frozenset(Algorithm(a) for a in self.settings.algorithms)
        self._secret: bytes | None = self.settings.secret.encode() if self.settings.secret else None
        self._breaker = _Breaker(self.settings.breaker_seconds)
        self._pending = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[object]] = set()
        self._listened_elsewhere = False

    # -- the interface -------------------------------------------------------------------

    def is_cacheable(self, algorithm: Algorithm, params: Argon2Params | None) -> bool:
        """True when results of ``algorithm`` with ``params`` may be cached: the algorithm is in
        the settings' list and the result is deterministic (never random-salt argon2id)."""
        if algorithm not in self._algorithms:
            return False
        if algorithm is Algorithm.ARGON2ID:
            return params is not None and params.deterministic
        return True

    @property
    def ready(self) -> bool:
        """True once the key secret is known (at once when configured)."""
        return self._secret is not None

    async def lookup(
        self, algorithm: Algorithm, params: Argon2Params | None, data: bytes, *, tenant: str
    ) -> CachedResult | None:
        """The result ``tenant`` cached, or ``None`` on a miss, when not cacheable (or no
        tenant), or when the shared tier is down or slow. Never raises for database trouble."""
        if self._secret is None or not tenant or not self.is_cacheable(algorithm, params):
            return None
        key = cache_key(self._secret, algorithm, params, data, tenant=tenant)
        found = self.memory.get(key)
        if found is not None:
            return found
        try:
            row = await self._shared(self._lookup_row, key)
        except SharedTierDown:
            return None
        if row is None:
            self.shared.misses += 1
            metrics.SHARED_CACHE_MISSES.inc()
            return None
        value, ttl = row
        self.shared.hits += 1
        metrics.SHARED_CACHE_HITS.inc()
        result = decode_value(value)
        self.memory.put(key, result, ttl)
        return result

    async def store(
        self,
        algorithm: Algorithm,
        params: Argon2Params | None,
        data: bytes,
        digest: bytes,
        encoded: str,
        *,
        tenant: str,
    ) -> bool:
        """Remember a result ``tenant`` computed, in both tiers (when cacheable). Returns whether
        the shared tier took it; never raises for database trouble."""
        if self._secret is None or not tenant or not self.is_cacheable(algorithm, params):
            return False
        key = cache_key(self._secret, algorithm, params, data, tenant=tenant)
        result = CachedResult(digest=digest, encoded=encoded)
        self.memory.put(key, result)
        try:
            await self._shared(self._store_row, key, encode_value(result))
        except SharedTierDown:
            return False
        return True

    async def stats(self) -> CacheStats:
        """Counters per tier; the shared tier's ``entries`` is counted now (0 when unreachable)."""
        self.memory.stats.entries = len(self.memory)
        with contextlib.suppress(SharedTierDown):
            self.shared.entries = await self._shared(self._count_rows, timeout=2.0)
        return CacheStats(
            memory=self.memory.stats, shared=self.shared, algorithms=self.settings.algorithms
        )

    async def clear(self) -> ClearResult:
        """Empty the shared table, this memory tier, and (via NOTIFY) every other process's
        memory tier. Raises ``Unavailable`` when PostgreSQL cannot be reached."""
        memory_removed = self.memory.clear()
        if self.table is None:
            return ClearResult(shared_removed=0, memory_removed=memory_removed)
        removed = await self.table.clear(self.instance)
        self.shared.evictions += removed
        log.info(
            "cache cleared", extra={"shared_removed": removed, "memory_removed": memory_removed}
        )
        return ClearResult(shared_removed=removed, memory_removed=memory_removed)

    async def start(self) -> None:
        """Start the background tasks; returns at once (nothing here waits for PostgreSQL)."""
        if self.table is None or self._tasks:
            return
        if self._secret is None:
            self._tasks.append(asyncio.create_task(self._load_secret(), name="cache-secret"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="cache-sweep"))
        # No memory tier: nothing to clear, no LISTEN; nor when another connection carries it.
        if self.settings.memory_entries > 0 and not self._listened_elsewhere:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="cache-listen"))

    def clear_notices(self) -> ClearNotices:
        """Hand the clear channel (``CLEAR_CHANNEL`` of the table) to a LISTEN connection the
        process holds anyway: the cache then opens none of its own. Call before ``start()``;
        the owner passes on each notification and says when some may have been missed."""
        self._listened_elsewhere = True
        return ClearNotices(self)

    def _cleared_by(self, sender: str) -> None:
        if sender == self.instance:  # our own clear(), which emptied the memory tier already
            return
        removed = self.memory.clear()
        log.info("memory cache cleared by another replica", extra={"removed": removed})

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the secret; True when the cache can be used."""
        deadline = time.monotonic() + timeout
        while self._secret is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self._secret is not None

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._background.clear()

    # -- the shared tier -----------------------------------------------------------------

    async def _shared(
        self, operation: Callable[..., Awaitable[T]], *args: object, timeout: float | None = None
    ) -> T:
        """Run one shared-tier operation within the timeout, fail-open. A slow operation keeps
        running in the background (so its connection goes back clean) but is no longer awaited."""
        if (
            self.table is None
            or not self._breaker.allows()
            or self._pending >= self.settings.max_pending
        ):
            raise SharedTierDown()
        self._pending += 1
        task: asyncio.Task[T] = asyncio.ensure_future(operation(*args))
        self._background.add(task)
        task.add_done_callback(self._operation_done)
        done, _ = await asyncio.wait({task}, timeout=timeout or self.settings.timeout_seconds)
        if not done:
            self._failed("timeout")
            raise SharedTierDown()
        exc = task.exception()
        if exc is not None:
            self._failed(type(exc).__name__)
            raise SharedTierDown() from exc
        self._breaker.succeeded()
        return task.result()

    def _operation_done(self, task: asyncio.Task[object]) -> None:
        self._pending -= 1
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # mark retrieved: a late failure is already counted

    def _failed(self, reason: str) -> None:
        self.shared.errors += 1
        was_closed = self._breaker.failures == 0
        self._breaker.failed()
        if was_closed:
            log.warning(
                "shared cache tier unavailable; answering uncached", extra={"reason": reason}
            )

    async def _lookup_row(self, key: bytes) -> tuple[bytes, float] | None:
        assert self.table is not None
        return await self.table.lookup(key, timeout=self.settings.timeout_seconds)

    async def _store_row(self, key: bytes, value: bytes) -> None:
        assert self.table is not None
        await self.table.put(
            key,
            value,
            ttl_seconds=self.settings.ttl_seconds,
            timeout=self.settings.timeout_seconds,
        )

    async def _count_rows(self) -> int:
        assert self.table is not None
        return await self.table.count(timeout=2.0)

    # -- background tasks ----------------------------------------------------------------

    async def _load_secret(self) -> None:
        """Create (first process) or read (the others) the per-database secret."""
        assert self.table is not None
        attempt = 0
        while self._secret is None:
            try:
                self._secret = await self.table.secret(os.urandom(32))
            except Unavailable as exc:
                log.warning("cannot load the cache secret yet", extra={"error": exc.message})
                await asyncio.sleep(RECONNECT.delay(attempt))
                attempt += 1
        log.warning("HASHMESH_CACHE_SECRET is not set: using the per-database cache secret")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            try:
                removed = await self.sweep()
                if removed:
                    log.info("swept expired cache rows", extra={"removed": removed})
            except Unavailable as exc:
                log.warning("cache sweep failed", extra={"error": exc.message})

    async def sweep(self, batch: int = 1000) -> int:
        """Remove expired shared rows, in batches so no statement runs long."""
        assert self.table is not None
        total = 0
        while True:
            removed = await self.table.sweep(batch)
            total += removed
            self.shared.evictions += removed
            if removed < batch:
                return total

    async def _listen_loop(self) -> None:
        """One LISTEN connection; reconnects with back-off and clears the memory tier after a
        reconnect too (a clear may have been missed meanwhile)."""
        assert self.table is not None
        listener = self.table.clear_listener()
        if listener is None:
            return
        attempt = 0
        connected_before = False
        try:
            while True:
                try:
                    await listener.connect()
                    if connected_before:
                        self.memory.clear()
                    connected_before = True
                    attempt = 0
                    while True:
                        for _channel, sender in await listener.wait(LISTEN_WAIT_SECONDS):
                            self._cleared_by(sender)
                except Unavailable as exc:
                    log.warning(
                        "cache clear listener lost its connection", extra={"error": exc.message}
                    )
                await asyncio.sleep(RECONNECT.delay(attempt))
                attempt += 1
        finally:
            await listener.close()


@dataclass(frozen=True)
class ClearNotices:
    """The cache's clear channel as another LISTEN connection carries it
    (``ResultCache.clear_notices()``; hashd's watch hub, ``hashd.watch.SideChannel``)."""

    cache: ResultCache

    def notified(self, payload: str) -> None:
        """A ``clear()`` somewhere: the payload is its process's instance id."""
        self.cache._cleared_by(payload)

    def missed(self) -> None:
        """The connection is back after a drop: a clear may have gone unheard meanwhile, so
        empty the memory tier (as the cache's own listener does after a reconnect)."""
        self.cache.memory.clear()
