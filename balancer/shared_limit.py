"""One rate limit shared by every balancer process: a token bucket per client in Redis.

Each bucket lives in one Redis hash, refilled and taken from by one Lua script (atomic in
Redis, as in Envoy's global rate-limit service), timed by Redis's own clock so processes on
different hosts agree. A process does not ask Redis on every call: it *leases* a few tokens at
a time (about ``lease_seconds`` of the client's rate) and spends them locally, and when Redis
says the bucket is empty it refuses locally until the next token is due. Redis therefore sees
at most one request per lease of admitted calls, and none for the calls it refuses, whatever
a client floods. Tokens leased but not spent are lost after ``LEASE_TTL`` seconds: in total
the N processes admit the bucket's output, never more, and at most N leases less.

When Redis cannot be reached (refused, timed out), ``admit`` raises ``StoreDown`` and the
limiter falls back to its own per-process buckets (fail open to local limits, as Envoy and
the seeds do); ``up`` says so, for the ``hashmesh_balancer_shared_limit_up`` gauge. Every
``retry_seconds`` one background PING checks whether Redis is back; calls never wait on it."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hashmesh.balancer.config import RateLimitSettings

log = logging.getLogger(__name__)

LEASE_TTL = 1.0
"""Seconds a leased token stays spendable; later it is dropped (never a burst above the limit)."""

# KEYS[1]: the bucket. ARGV: rate, capacity, tokens wanted, now (seconds; negative: Redis TIME),
# expiry in ms. Returns {granted, tokens left, seconds until the next whole token}; floats as
# strings, since Redis truncates Lua numbers to integers.
TAKE_SCRIPT = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
  at = now
end
if now > at then
  tokens = math.min(capacity, tokens + (now - at) * rate)
  at = now
end
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(at))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local wait = 0
if tokens < 1 then
  wait = (1 - tokens) / rate
end
return {granted, tostring(tokens), tostring(wait)}
"""


class StoreDown(Exception):
    """Redis did not answer: the caller decides with its local bucket instead."""


class Grant:
    """One admitted call's view of the shared bucket (for the ``x-ratelimit-*`` headers)."""

    __slots__ = ("limit", "remaining")

    def __init__(self, limit: int, remaining: int) -> None:
        self.limit = limit
        self.remaining = remaining


class Refusal(Exception):
    """The shared bucket is empty; the next token is due in ``retry_after`` seconds."""

    def __init__(self, retry_after: float, limit: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after
        self.limit = limit


class _Lease:
    __slots__ = ("empty_until", "expires", "pending", "store_left", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.expires = 0.0
        self.empty_until = 0.0
        self.store_left = 0.0
        self.pending: asyncio.Future[None] | None = None


def lease_size(spec: RateLimitSettings, lease_seconds: float) -> int:
    """Tokens asked for at once: ``lease_seconds`` of the rate, at least 1, at most a quarter
    of the burst (so one process never empties the bucket for the others in one go)."""
    by_rate = math.floor(spec.rate * lease_seconds)
    return max(1, min(by_rate, math.floor(spec.capacity / 4)))


class SharedLimit:
    """Leases tokens of shared buckets. ``store_clock`` (seconds) replaces Redis's clock for
    tests; ``clock`` times the local leases."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "hashmesh:ratelimit:",
        lease_seconds: float = 0.02,
        retry_seconds: float = 1.0,
        table_size: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
        store_clock: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self._take = client.register_script(TAKE_SCRIPT)
        self._prefix = prefix
        self._lease_seconds = lease_seconds
        self._retry_seconds = retry_seconds
        self._table_size = table_size
        self._clock = clock
        self._store_clock = store_clock
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._probe: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self.up = True
        self.failures = 0
        """Times Redis failed while up (each turns the limiter local until it is back)."""

    @classmethod
    def from_url(cls, url: str, *, timeout: float, **options: Any) -> SharedLimit:
        """A client for ``redis://host:port/db`` (or ``rediss://``, ``unix://``); no I/O yet."""
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        return cls(client, **options)

    def usable(self) -> bool:
        """True while Redis answers; when down, starts a background check once it is due."""
        if self.up:
            return True
        if self._probe is None and self._clock() >= self._retry_at:
            self._probe = asyncio.get_running_loop().create_task(self._check(), name="redis-probe")
        return False

    async def admit(self, peer: str, spec: RateLimitSettings) -> Grant:
        """Take one token of ``peer``'s shared bucket. Raises ``Refusal`` when it is empty,
        ``StoreDown`` when Redis does not answer."""
        key = f"{spec.rate:g}/{spec.capacity:g}:{peer}"
        lease = self._leases.get(key)
        if lease is None:
            lease = self._leases[key] = _Lease()
            if len(self._leases) > self._table_size:
                self._leases.popitem(last=False)
        else:
            self._leases.move_to_end(key)
        limit = int(spec.capacity)
        for _ in range(4):  # each turn spends, refuses, or waits for one answer from Redis
            now = self._clock()
            if lease.tokens > 0 and now < lease.expires:
                lease.tokens -= 1
                return Grant(limit, int(lease.store_left) + lease.tokens)
            if now < lease.empty_until:
                raise Refusal(lease.empty_until - now, limit)
            pending = lease.pending
            if pending is None:
                pending = lease.pending = asyncio.get_running_loop().create_future()
                try:
                    await self._lease(key, lease, spec)
                finally:
                    lease.pending = None
                    pending.set_result(None)
            else:
                await asyncio.shield(pending)  # a waiter cancelled must not cancel the others
            if not self.up:
                raise StoreDown("Redis is down")
        raise Refusal(1.0 / spec.rate, limit)

    async def _lease(self, key: str, lease: _Lease, spec: RateLimitSettings) -> None:
        want = lease_size(spec, self._lease_seconds)
        now_arg = self._store_clock() if self._store_clock is not None else -1.0
        expiry_ms = math.ceil(spec.capacity / spec.rate * 1000) + 1000
        try:
            granted, left, wait = await self._take(
                keys=[self._prefix + key], args=[spec.rate, spec.capacity, want, now_arg, expiry_ms]
            )
        except (RedisError, OSError) as exc:
            self._went_down(exc)
            return
        now = self._clock()
        lease.tokens = int(granted)
        lease.expires = now + LEASE_TTL
        lease.store_left = float(left)
        wait_seconds = float(wait)
        lease.empty_until = now + wait_seconds if lease.tokens == 0 and wait_seconds > 0 else 0.0

    def _went_down(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            self.failures += 1
            log.warning(
                "shared rate-limit store down: failing open to local limits",
                extra={"error": str(exc)},
            )
        self._leases.clear()
        self._retry_at = self._clock() + self._retry_seconds

    async def _check(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            self._retry_at = self._clock() + self._retry_seconds
            log.debug("shared rate-limit store still down", extra={"error": str(exc)})
        else:
            self._leases.clear()
            self.up = True
            log.warning("shared rate-limit store back: limits are shared again")
        finally:
            self._probe = None

    def forget(self) -> None:
        """Drop every lease (limits changed; the next calls lease afresh)."""
        self._leases.clear()

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        await self._client.aclose()
