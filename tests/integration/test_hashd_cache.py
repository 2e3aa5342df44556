"""The result cache with real hashd processes and a real PostgreSQL: shared by replicas, no
plaintext stored or logged, cleared everywhere, failing open when PostgreSQL stops."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import psycopg

from hashmesh.core.hashing.algorithms import Algorithm, Argon2Params
from hashmesh.core.hashing.cache import CachedResult, CacheSettings, ResultCache
from hashmesh.core.queue.cache_table import PostgresCacheTable
from hashmesh.core.queue.embedded_pg import EmbeddedPostgres
from hashmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, hash_pb2, hash_pb2_grpc
from tests.conftest import Processes
from tests.stamps import channel_as

SECRET_ENV = {"HASHMESH_CACHE_SECRET": "integration-secret", "HASHMESH_LOG_LEVEL": "DEBUG"}
SALTED = common_pb2.Argon2Params(
    time_cost=1, memory_cost_kib=8192, parallelism=1, salt=b"pepper-salt-16by"
)


def _argon2(
    address: str, password: bytes, params: common_pb2.Argon2Params
) -> common_pb2.HashResult:
    with grpc.insecure_channel(address) as channel:
        reply = hash_pb2_grpc.HashServiceStub(channel).Hash(
            hash_pb2.HashRequest(
                algorithm=common_pb2.ALGORITHM_ARGON2ID, data=password, argon2=params
            ),
            timeout=30,
        )
    return reply.result


def _stats(address: str) -> dict[int, cache_pb2.CacheTierStats]:
    with channel_as(address, "ops", operator=True) as channel:  # the replica's address: operators
        reply = cache_pb2_grpc.CacheServiceStub(channel).GetCacheStats(
            cache_pb2.GetCacheStatsRequest(), timeout=10
        )
    assert reply.replica == address
    assert list(reply.cached_algorithms) == [common_pb2.ALGORITHM_ARGON2ID]
    assert list(reply.cached_algorithm_names) == ["argon2id"]
    return {tier.tier: tier for tier in reply.tiers}


def test_cache_is_shared_by_replicas_holds_no_plaintext_and_clears_everywhere(
    dsn: str, procs: Processes
) -> None:
    first = procs.hashd(dsn, env=SECRET_ENV)
    second = procs.hashd(dsn, env=SECRET_ENV)
    password = f"pw-{uuid.uuid4().hex}".encode()

    computed = _argon2(first.address, password, SALTED)
    assert not computed.cached
    from_shared = _argon2(second.address, password, SALTED)
    assert from_shared.cached
    assert (from_shared.digest, from_shared.encoded) == (computed.digest, computed.encoded)
    from_memory = _argon2(second.address, password, SALTED)
    assert from_memory.cached
    stats = _stats(second.address)
    assert stats[cache_pb2.CACHE_TIER_SHARED].hits == 1
    assert stats[cache_pb2.CACHE_TIER_MEMORY].hits == 1
    assert stats[cache_pb2.CACHE_TIER_SHARED].entries == 1

    # A random salt is never cached.
    unsalted = common_pb2.Argon2Params(time_cost=1, memory_cost_kib=8192, parallelism=1)
    one, two = (_argon2(first.address, password, unsalted) for _ in range(2))
    assert not one.cached and not two.cached and one.encoded != two.encoded

    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT key, value FROM hashmesh_cache").fetchall()
    assert len(rows) == 1
    for key, value in rows:
        for form in (password, password.hex().encode(), password.decode().encode("utf-16-le")):
            assert form not in bytes(key) and form not in bytes(value)

    # Each replica's clears come over its watch hub's LISTEN connection: no second one, which
    # PostgreSQL would wake at every notifying commit of every task.
    with psycopg.connect(dsn) as conn:
        listening = dict(
            conn.execute(
                "SELECT application_name, count(*) FROM pg_stat_activity"
                " WHERE datname = current_database()"
                " AND query ILIKE 'LISTEN%' GROUP BY 1"
            ).fetchall()
        )
    assert listening == {"hashd-watch": 2}, listening

    # Clearing through one replica empties the table and the other replica's memory tier.
    with channel_as(first.address, "ops", operator=True) as channel:
        cleared = cache_pb2_grpc.CacheServiceStub(channel).ClearCache(
            cache_pb2.ClearCacheRequest(), timeout=10
        )
    assert cleared.shared_entries_removed == 1
    deadline = time.monotonic() + 10
    while _stats(second.address)[cache_pb2.CACHE_TIER_MEMORY].entries:
        assert time.monotonic() < deadline, "the other replica kept its memory tier"
        time.sleep(0.05)
    assert not _argon2(second.address, password, SALTED).cached

    # Failing calls carry the password too; none of it may be logged either.
    with grpc.insecure_channel(first.address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)
        bad_calls = [
            hash_pb2.HashRequest(
                algorithm=common_pb2.ALGORITHM_ARGON2ID,
                data=password,
                argon2=common_pb2.Argon2Params(time_cost=99),
            ),
            hash_pb2.VerifyRequest(data=password, encoded="$argon2id$v=19$broken"),
            hash_pb2.VerifyRequest(data=password, encoded=computed.encoded + "x"),
        ]
        for request in bad_calls:
            method = stub.Hash if isinstance(request, hash_pb2.HashRequest) else stub.Verify
            try:
                method(request, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert password.decode() not in (exc.details() or "")

    # Nothing about the password reached either process's log.
    for proc in (first, second):
        proc.terminate()
        log = proc.log()
        assert "hashd listening" in log
        assert password.decode() not in log and password.hex() not in log


def test_hashing_works_uncached_when_postgresql_stops(
    owned_pg: EmbeddedPostgres, procs: Processes
) -> None:
    replica = procs.hashd(owned_pg.dsn, env={**SECRET_ENV, "HASHMESH_CACHE_TIMEOUT_MS": "1000"})
    remembered = _argon2(replica.address, b"before-the-outage", SALTED)
    assert not remembered.cached
    owned_pg.stop()

    again = _argon2(replica.address, b"before-the-outage", SALTED)
    assert again.cached and again.encoded == remembered.encoded  # the memory tier still answers
    for attempt in range(3):
        fresh = _argon2(replica.address, f"during-{attempt}".encode(), SALTED)
        assert not fresh.cached
    with grpc.insecure_channel(replica.address) as channel:
        reply = hash_pb2_grpc.HashServiceStub(channel).Hash(
            hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"x"), timeout=5
        )
    assert reply.result.encoded.startswith("2d711642")
    shared = _stats(replica.address)[cache_pb2.CACHE_TIER_SHARED]
    assert shared.errors >= 1

    owned_pg.start()
    # Back again: the breaker closes after its back-off and the shared tier takes writes.
    deadline = time.monotonic() + 30
    while True:
        _argon2(replica.address, f"after-{time.monotonic_ns()}".encode(), SALTED)
        with psycopg.connect(owned_pg.dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM hashmesh_cache WHERE expires_at < 'infinity'"
            ).fetchone()
        if row and row[0] >= 2:
            break
        assert time.monotonic() < deadline, "the shared tier did not come back"
        time.sleep(0.3)


def _pool(dsn: str) -> object:
    from hashmesh.core.queue import db
    from hashmesh.core.settings import DatabaseSettings

    return db.make_pool(DatabaseSettings(dsn=dsn, pool_min=0, pool_max=4), name="test-cache")


PARAMS = Argon2Params.build(salt=b"saltsalt", time_cost=1, memory_cost_kib=8192, parallelism=1)


def test_per_database_secret_ttl_sweep_and_slow_database(dsn: str) -> None:
    async def scenario() -> None:
        pool_a, pool_b = _pool(dsn), _pool(dsn)
        await pool_a.open(wait=False)  # type: ignore[attr-defined]
        await pool_b.open(wait=False)  # type: ignore[attr-defined]
        # A timeout far above a loaded machine's query time (the default, 100 ms, is not): a
        # miss here must mean the lock below, never a slow moment.
        patient = 3.0
        a = ResultCache(PostgresCacheTable(pool_a), CacheSettings(timeout_seconds=patient))
        short = ResultCache(
            PostgresCacheTable(pool_a), CacheSettings(ttl_seconds=0.5, timeout_seconds=patient)
        )
        b = ResultCache(
            PostgresCacheTable(pool_b), CacheSettings(memory_entries=0, timeout_seconds=patient)
        )
        try:
            for cache in (a, b, short):
                await cache.start()
                assert await cache.wait_ready(10)
            # No secret configured: both found the same per-database one.
            assert await a.store(Algorithm.ARGON2ID, PARAMS, b"pw", b"d", "e", tenant="t")
            assert await b.lookup(Algorithm.ARGON2ID, PARAMS, b"pw", tenant="t") == CachedResult(
                b"d", "e"
            )
            assert (await b.stats()).shared.entries == 1  # the secret row is not counted

            # Slow PostgreSQL: a lock holds the table; lookups give up and answer a miss.
            async with await psycopg.AsyncConnection.connect(dsn) as locker:
                await locker.execute("LOCK TABLE hashmesh_cache IN ACCESS EXCLUSIVE MODE")
                assert await b.lookup(Algorithm.ARGON2ID, PARAMS, b"pw", tenant="t") is None
                assert not await b.store(Algorithm.ARGON2ID, PARAMS, b"pw2", b"d", "e", tenant="t")
                await locker.rollback()
            assert b.shared.errors == 1  # the store after it was skipped: the breaker is open
            # The breaker closes again after its back-off (at most 2 s here): the hit returns.
            deadline = asyncio.get_running_loop().time() + 20
            while await b.lookup(Algorithm.ARGON2ID, PARAMS, b"pw", tenant="t") is None:
                assert asyncio.get_running_loop().time() < deadline, "the breaker stayed open"
                await asyncio.sleep(0.1)

            # TTL: the row expires, lookups miss, the sweep removes it (not the secret).
            assert await short.store(Algorithm.ARGON2ID, PARAMS, b"brief", b"d", "e", tenant="t")
            await asyncio.sleep(0.6)
            assert await b.lookup(Algorithm.ARGON2ID, PARAMS, b"brief", tenant="t") is None
            assert await a.sweep() == 1
            async with pool_a.connection() as conn:  # type: ignore[attr-defined]
                cur = await conn.execute("SELECT count(*) AS n FROM hashmesh_cache")
                row = await cur.fetchone()
            assert row["n"] == 2  # the secret and the unexpired row
        finally:
            for cache in (a, b, short):
                await cache.stop()
            await pool_a.close()  # type: ignore[attr-defined]
            await pool_b.close()  # type: ignore[attr-defined]

    asyncio.run(scenario())
