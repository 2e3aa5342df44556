"""The two-tier result cache shared by hashd (HashService, TaskService) and workerd.

Tiers: a bounded in-process LRU (``memory``, one per process) in front of the PostgreSQL table
``hashmesh_cache`` (``shared``, one per mesh). A lookup tries memory, then the table; a hit in
the table is copied into memory. A store writes both.

Stable interface (other modules depend on it)::

    cache = ResultCache(pool, CacheSettings.from_env())   # no I/O here
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

Connections: borrowed from the caller's pool (no pool of its own), plus one LISTEN connection
per process when the memory tier is on (``memory_entries > 0``). A process that only stores
(workerd) can turn the memory tier off and save that connection. See hashd/CACHE.md.
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
from typing import TypeVar

import psycopg
import psycopg_pool

from hashmesh.core import metrics
from hashmesh.core.db import backoff_delay
from hashmesh.core.hashing import Algorithm, Argon2Params
from hashmesh.core.settings import SettingsError, env_float, env_int, env_list, env_str

log = logging.getLogger(__name__)

T = TypeVar("T")

CLEAR_CHANNEL = "hashmesh_cache_clear"
# The per-database secret (used when no secret is configured) lives in the cache table under
# this key; cache keys are 32-byte HMACs, so it cannot collide with one, and its expiry is
# 'infinity', so the sweeper never removes it.
SECRET_KEY = b"hashmesh:cache-secret:v1"
_KEY_DOMAIN = b"hashmesh-cache-v2\x00"

_SQL = {
    "lookup": """UPDATE hashmesh_cache
                 SET access_count = access_count + 1, last_accessed = now()
                 WHERE key = %s AND expires_at > now()
                 RETURNING value, extract(epoch FROM expires_at - now()) AS ttl""",
    "store": """INSERT INTO hashmesh_cache (key, value, expires_at)
                VALUES (%s, %s, now() + make_interval(secs => %s))
                ON CONFLICT (key) DO UPDATE
                SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at""",
    "sweep": """DELETE FROM hashmesh_cache WHERE key IN (
                    SELECT key FROM hashmesh_cache WHERE expires_at < now() LIMIT %s)""",
    "count": "SELECT count(*) AS n FROM hashmesh_cache WHERE expires_at > now() AND key <> %s",
    "clear": "DELETE FROM hashmesh_cache WHERE key <> %s",
    "notify": "SELECT pg_notify(%s, %s)",
    "secret_create": """INSERT INTO hashmesh_cache (key, value, expires_at)
                        VALUES (%s, %s, 'infinity') ON CONFLICT (key) DO NOTHING""",
    "secret_read": "SELECT value FROM hashmesh_cache WHERE key = %s",
}


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
    empty turns the cache off). Default chosen by measurement: see hashd/CACHE.md."""
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

    pool: psycopg_pool.AsyncConnectionPool | None
    """Pool to borrow connections from; ``None`` leaves only the memory tier (tests, tools)."""
    settings: CacheSettings = field(default_factory=CacheSettings)
    dsn: str | None = None
    """DSN for the LISTEN connection; defaults to the pool's."""
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
        from hashmesh.core.db import connection

        memory_removed = self.memory.clear()
        if self.pool is None:
            return ClearResult(shared_removed=0, memory_removed=memory_removed)
        async with connection(self.pool, what="clearing the cache") as conn:
            cur = await conn.execute(_SQL["clear"], (SECRET_KEY,))
            removed = cur.rowcount
            await conn.execute(_SQL["notify"], (CLEAR_CHANNEL, self.instance))
        self.shared.evictions += max(0, removed)
        log.info(
            "cache cleared", extra={"shared_removed": removed, "memory_removed": memory_removed}
        )
        return ClearResult(shared_removed=max(0, removed), memory_removed=memory_removed)

    async def start(self) -> None:
        """Start the background tasks; returns at once (nothing here waits for PostgreSQL)."""
        if self.pool is None or self._tasks:
            return
        if self._secret is None:
            self._tasks.append(asyncio.create_task(self._load_secret(), name="cache-secret"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="cache-sweep"))
        if self.settings.memory_entries > 0:  # no memory tier: nothing to clear, no LISTEN
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="cache-listen"))

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
            self.pool is None
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
        assert self.pool is not None
        async with self.pool.connection(timeout=self.settings.timeout_seconds) as conn:
            cur = await conn.execute(_SQL["lookup"], (key,), prepare=True)
            row = await cur.fetchone()
        if row is None:
            return None
        return bytes(row["value"]), float(row["ttl"])  # type: ignore[call-overload]

    async def _store_row(self, key: bytes, value: bytes) -> None:
        assert self.pool is not None
        async with self.pool.connection(timeout=self.settings.timeout_seconds) as conn:
            await conn.execute(_SQL["store"], (key, value, self.settings.ttl_seconds), prepare=True)

    async def _count_rows(self) -> int:
        assert self.pool is not None
        async with self.pool.connection(timeout=2.0) as conn:
            cur = await conn.execute(_SQL["count"], (SECRET_KEY,))
            row = await cur.fetchone()
        return int(row["n"]) if row else 0  # type: ignore[call-overload]

    # -- background tasks ----------------------------------------------------------------

    async def _load_secret(self) -> None:
        """Create (first process) or read (the others) the per-database secret."""
        assert self.pool is not None
        attempt = 0
        while self._secret is None:
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(_SQL["secret_create"], (SECRET_KEY, os.urandom(32)))
                    cur = await conn.execute(_SQL["secret_read"], (SECRET_KEY,))
                    row = await cur.fetchone()
                if row is not None:
                    self._secret = bytes(row["value"])  # type: ignore[call-overload]
                    log.warning(
                        "HASHMESH_CACHE_SECRET is not set: using the per-database cache secret",
                    )
                    return
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                log.warning("cannot load the cache secret yet", extra={"error": type(exc).__name__})
            await asyncio.sleep(backoff_delay(attempt, 0.2, 5.0))
            attempt += 1

    async def _sweep_loop(self) -> None:
        assert self.pool is not None
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            try:
                removed = await self.sweep()
                if removed:
                    log.info("swept expired cache rows", extra={"removed": removed})
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                log.warning("cache sweep failed", extra={"error": type(exc).__name__})

    async def sweep(self, batch: int = 1000) -> int:
        """Remove expired shared rows, in batches so no statement runs long."""
        assert self.pool is not None
        total = 0
        while True:
            async with self.pool.connection() as conn:
                cur = await conn.execute(_SQL["sweep"], (batch,))
                removed = max(0, cur.rowcount)
            total += removed
            self.shared.evictions += removed
            if removed < batch:
                return total

    async def _listen_loop(self) -> None:
        """One LISTEN connection; reconnects with back-off and clears the memory tier after a
        reconnect too (a clear may have been missed meanwhile)."""
        dsn = self.dsn or (self.pool.conninfo if self.pool is not None else None)
        if not isinstance(dsn, str) or not dsn:
            return
        attempt = 0
        connected_before = False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    dsn, autocommit=True, application_name="hashmesh-cache-listen"
                ) as conn:
                    await conn.execute(f"LISTEN {CLEAR_CHANNEL}")
                    if connected_before:
                        self.memory.clear()
                    connected_before = True
                    attempt = 0
                    async for notice in conn.notifies():
                        if notice.payload != self.instance:
                            removed = self.memory.clear()
                            log.info(
                                "memory cache cleared by another replica",
                                extra={"removed": removed},
                            )
            except psycopg.Error as exc:
                log.warning(
                    "cache clear listener lost its connection", extra={"error": type(exc).__name__}
                )
            await asyncio.sleep(backoff_delay(attempt, 0.2, 10.0))
            attempt += 1
