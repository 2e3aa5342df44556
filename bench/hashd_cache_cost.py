"""Lookup cost against compute cost, per algorithm and input size: the measurement behind the
default ``HASHMESH_CACHE_ALGORITHMS`` (hashd/CACHE.md). Run through bench/hashd_bench.py
(``--only cost``) or alone: ``python bench/hashd_cache_cost.py DSN``.

In-process, one event loop: compute = the hash itself; memory hit = HMAC key + LRU get;
shared hit = HMAC key + one PostgreSQL round trip (memory tier off), through ResultCache."""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable

from hashmesh.core.hashing import algorithms
from hashmesh.core.hashing.algorithms import Algorithm, Argon2Params
from hashmesh.core.hashing.cache import CacheSettings, ResultCache
from hashmesh.core.queue import db
from hashmesh.core.queue.cache_table import PostgresCacheTable
from hashmesh.core.settings import DatabaseSettings

SIZES = (32, 1024, 64 * 1024, 1024 * 1024)


def per_call(fn: Callable[[], object], budget: float = 0.2) -> float:
    """Median seconds per call over a few timed batches."""
    fn()
    runs = []
    for _ in range(5):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < budget / 5:
            fn()
            count += 1
        runs.append((time.perf_counter() - started) / count)
    return statistics.median(runs)


async def async_per_call(fn: Callable[[], object], calls: int = 200) -> float:
    await fn()  # type: ignore[misc]
    started = time.perf_counter()
    for _ in range(calls):
        await fn()  # type: ignore[misc]
    return (time.perf_counter() - started) / calls


async def run(dsn: str) -> None:
    pool = db.make_pool(DatabaseSettings(dsn=dsn, pool_min=1, pool_max=2), name="bench-cost")
    await pool.open(wait=True)
    every = tuple(a.value for a in Algorithm)
    memory = ResultCache(None, CacheSettings(secret="bench", algorithms=every))
    shared = ResultCache(
        PostgresCacheTable(pool),
        CacheSettings(secret="bench", algorithms=every, memory_entries=0, timeout_seconds=1.0),
    )
    print("\n## cache lookup cost vs compute cost (us per call, in-process)")
    print(f"{'algorithm':10} {'input':>8} {'compute':>10} {'memory hit':>11} {'shared hit':>11}")
    try:
        for algorithm in Algorithm:
            if algorithm is Algorithm.ARGON2ID:
                continue
            for size in SIZES:
                data = os.urandom(size)
                raw = algorithms.digest(algorithm, data)
                await memory.store(algorithm, None, data, raw, raw.hex())
                await shared.store(algorithm, None, data, raw, raw.hex())
                compute = per_call(functools.partial(algorithms.digest, algorithm, data))
                mem = await async_per_call(
                    functools.partial(memory.lookup, algorithm, None, data), 2000
                )
                pg = await async_per_call(functools.partial(shared.lookup, algorithm, None, data))
                print(
                    f"{algorithm.value:10} {size:>8} {compute * 1e6:>10.1f} {mem * 1e6:>11.1f} {pg * 1e6:>11.1f}"
                )
        for label, params in (
            (
                "argon2id minimum (t=1 m=8MiB p=1)",
                Argon2Params.build(
                    salt=b"saltsalt", time_cost=1, memory_cost_kib=8192, parallelism=1
                ),
            ),
            ("argon2id default (t=3 m=64MiB p=4)", Argon2Params.build(salt=b"saltsalt")),
        ):
            raw, encoded = algorithms.argon2id(b"password", params)
            await shared.store(Algorithm.ARGON2ID, params, b"password", raw, encoded, tenant="t")
            compute = statistics.median(
                _timed(functools.partial(algorithms.argon2id, b"password", params))
                for _ in range(5)
            )
            pg = await async_per_call(
                functools.partial(shared.lookup, Algorithm.ARGON2ID, params, b"password")
            )
            print(
                f"{label:34} compute {compute * 1e6:>9.0f} us   shared hit {pg * 1e6:>6.0f} us   ratio {compute / pg:.0f}x"
            )
    finally:
        await pool.close()


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1]))
