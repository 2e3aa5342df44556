"""CacheService: statistics and clearing of the result cache (for ``hashctl cache``).

Clearing changes what every tenant gets, so it is an operator call; the statistics are for
everyone, but only an operator sees which replica answered (an internal address)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from hashmesh.core.hashing.algorithms import Algorithm
from hashmesh.core.hashing.cache import ResultCache, TierStats
from hashmesh.core.hashing.wire import algorithm_to_wire
from hashmesh.hashd.identity import current_caller, require_operator
from hashmesh.v1 import cache_pb2, cache_pb2_grpc


def _tier(tier: cache_pb2.CacheTier.ValueType, stats: TierStats) -> cache_pb2.CacheTierStats:
    return cache_pb2.CacheTierStats(
        tier=tier,
        hits=stats.hits,
        misses=stats.misses,
        entries=stats.entries,
        evictions=stats.evictions,
        errors=stats.errors,
    )


class CacheService(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: ResultCache, replica: Callable[[], str]) -> None:
        self._cache = cache
        self._replica = replica

    async def GetCacheStats(
        self,
        request: cache_pb2.GetCacheStatsRequest,
        context: grpc.aio.ServicerContext[
            cache_pb2.GetCacheStatsRequest, cache_pb2.GetCacheStatsResponse
        ],
    ) -> cache_pb2.GetCacheStatsResponse:
        stats = await self._cache.stats()
        return cache_pb2.GetCacheStatsResponse(
            tiers=[
                _tier(cache_pb2.CACHE_TIER_MEMORY, stats.memory),
                _tier(cache_pb2.CACHE_TIER_SHARED, stats.shared),
            ],
            replica=self._replica() if current_caller().operator else "",
            cached_algorithm_names=list(stats.algorithms),
            cached_algorithms=[algorithm_to_wire(Algorithm(name)) for name in stats.algorithms],
        )

    async def ClearCache(
        self,
        request: cache_pb2.ClearCacheRequest,
        context: grpc.aio.ServicerContext[
            cache_pb2.ClearCacheRequest, cache_pb2.ClearCacheResponse
        ],
    ) -> cache_pb2.ClearCacheResponse:
        require_operator("ClearCache")
        cleared = await self._cache.clear()
        return cache_pb2.ClearCacheResponse(
            shared_entries_removed=cleared.shared_removed,
            memory_entries_removed=cleared.memory_removed,
        )
