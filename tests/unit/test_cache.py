from __future__ import annotations

import asyncio

import pytest

from hashmesh.core.hashing.algorithms import Algorithm, Argon2Params
from hashmesh.core.hashing.cache import (
    CachedResult,
    CacheSettings,
    MemoryTier,
    ResultCache,
    cache_key,
    decode_value,
    encode_value,
)
from hashmesh.core.settings import SettingsError

SALTED = Argon2Params.build(salt=b"saltsalt", time_cost=1, memory_cost_kib=8192, parallelism=1)
RANDOM = Argon2Params.build(time_cost=1, memory_cost_kib=8192, parallelism=1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_memory_tier_is_a_bounded_lru_with_expiry() -> None:
    clock = FakeClock()
    tier = MemoryTier(capacity=2, ttl_seconds=10, clock=clock)
    a, b, c = (CachedResult(bytes([i]), str(i)) for i in range(3))
    tier.put(b"a", a)
    tier.put(b"b", b)
    assert tier.get(b"a") == a  # a is now the most recent
    tier.put(b"c", c)  # evicts b, the least recently used
    assert tier.get(b"b") is None
    assert tier.get(b"c") == c
    assert tier.stats.evictions == 1
    clock.now = 11
    assert tier.get(b"a") is None  # expired
    assert (tier.stats.hits, tier.stats.misses, tier.stats.evictions) == (2, 2, 2)
    assert tier.clear() == 1


def test_memory_tier_honours_a_shorter_remaining_ttl() -> None:
    clock = FakeClock()
    tier = MemoryTier(capacity=4, ttl_seconds=100, clock=clock)
    tier.put(b"k", CachedResult(b"d", "e"), ttl=1)
    clock.now = 2
    assert tier.get(b"k") is None


def test_cache_key_covers_every_input_and_the_secret() -> None:
    base = cache_key(b"s", Algorithm.ARGON2ID, SALTED, b"pw", tenant="t")
    assert base == cache_key(b"s", Algorithm.ARGON2ID, SALTED, b"pw", tenant="t")
    assert len(base) == 32
    others = {
        cache_key(b"t", Algorithm.ARGON2ID, SALTED, b"pw", tenant="t"),
        cache_key(b"s", Algorithm.ARGON2ID, SALTED, b"pw2", tenant="t"),
        cache_key(
            b"s", Algorithm.ARGON2ID, Argon2Params.build(salt=b"saltsalX"), b"pw", tenant="t"
        ),
        cache_key(
            b"s",
            Algorithm.ARGON2ID,
            Argon2Params.build(salt=b"saltsalt", hash_len=33),
            b"pw",
            tenant="t",
        ),
        cache_key(b"s", Algorithm.SHA256, None, b"pw", tenant="t"),
        cache_key(b"s", Algorithm.MD5, None, b"pw", tenant="t"),
        # Another tenant's entry for the same input is another key (no cross-tenant oracle).
        cache_key(b"s", Algorithm.ARGON2ID, SALTED, b"pw", tenant="u"),
    }
    assert base not in others and len(others) == 7
    assert b"pw" not in base


def test_value_round_trip() -> None:
    result = CachedResult(b"\x00\xffdigest", "$argon2id$v=19$m=8192,t=1,p=1$c2FsdA$aGFzaA")
    assert decode_value(encode_value(result)) == result


def test_only_listed_deterministic_algorithms_are_cacheable() -> None:
    cache = ResultCache(None, CacheSettings(secret="k", algorithms=("argon2id", "sha512")))
    assert cache.is_cacheable(Algorithm.ARGON2ID, SALTED)
    assert not cache.is_cacheable(Algorithm.ARGON2ID, RANDOM)
    assert not cache.is_cacheable(Algorithm.ARGON2ID, None)
    assert cache.is_cacheable(Algorithm.SHA512, None)
    assert not cache.is_cacheable(Algorithm.SHA256, None)


def test_memory_only_cache_stores_and_finds() -> None:
    async def scenario() -> None:
        cache = ResultCache(None, CacheSettings(secret="k"))
        assert await cache.lookup(Algorithm.ARGON2ID, SALTED, b"pw", tenant="t") is None
        assert not await cache.store(Algorithm.ARGON2ID, SALTED, b"pw", b"d", "e", tenant="t")
        assert await cache.lookup(Algorithm.ARGON2ID, SALTED, b"pw", tenant="t") == CachedResult(
            b"d", "e"
        )
        await cache.store(Algorithm.ARGON2ID, RANDOM, b"pw2", b"d", "e", tenant="t")
        assert await cache.lookup(Algorithm.ARGON2ID, RANDOM, b"pw2", tenant="t") is None
        stats = await cache.stats()
        assert (stats.memory.hits, stats.memory.entries) == (1, 1)
        assert (await cache.clear()).memory_removed == 1

    asyncio.run(scenario())


def test_no_secret_means_no_caching_until_loaded() -> None:
    async def scenario() -> None:
        cache = ResultCache(None, CacheSettings())
        await cache.store(Algorithm.ARGON2ID, SALTED, b"pw", b"d", "e", tenant="t")
        assert await cache.lookup(Algorithm.ARGON2ID, SALTED, b"pw", tenant="t") is None
        assert not cache.ready

    asyncio.run(scenario())


def test_settings_reject_unknown_algorithms_and_parse_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError):
        CacheSettings(algorithms=("sha999",))
    monkeypatch.setenv("HASHMESH_CACHE_ALGORITHMS", "Argon2id, SHA3-256")
    monkeypatch.setenv("HASHMESH_CACHE_TIMEOUT_MS", "250")
    settings = CacheSettings.from_env()
    assert settings.algorithms == ("argon2id", "sha3_256")
    assert settings.timeout_seconds == 0.25
