"""Per-peer rate limits: one aiolimiter leaky bucket per peer, in a bounded table.

A bucket left idle long enough to refill completely is the same as a fresh one, so dropping it
loses nothing: the table keeps only peers seen recently (and at most ``table_size`` of them,
least recently seen evicted first). A refusal never waits inside the limiter: ``has_capacity``
decides, ``acquire`` then takes the token without suspending.

With a ``SharedLimit`` (Redis), the limit is one for every balancer process: the shared bucket
decides, and these local buckets decide only while Redis is down (fail open to local limits:
each process then enforces the whole limit by itself)."""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable

from aiolimiter import AsyncLimiter

from hashmesh.balancer.config import RateLimitSettings
from hashmesh.balancer.ratelimit_fields import (
    DEFAULT_POLICY,
    OVERRIDE_POLICY,
    near_exhaustion,
    policy_field,
    remaining_field,
)
from hashmesh.balancer.shared_limit import Refusal, SharedLimit, StoreDown
from hashmesh.core.errors import ResourceExhausted

REFUSAL_TABLE_SIZE = 10_000
SWEEP_EVERY = 256


class Allowance:
    """What a call learns about its client's limit, sent back in the answer's metadata as the
    IETF RateLimit fields (``balancer.ratelimit_fields``). (A plain class: a frozen
    dataclass costs a few microseconds per call to build.)"""

    __slots__ = ("_policy_field", "policy", "quota", "remaining", "reset", "window")

    def __init__(
        self,
        policy: str,
        quota: int,
        window: float,
        remaining: int,
        reset: float,
        policy_metadata: tuple[str, str] | None = None,
    ) -> None:
        self.policy = policy
        self.quota = quota
        self.window = window
        self.remaining = remaining
        self.reset = reset
        # The same for every call of a bucket: formatted once per bucket, not per call.
        self._policy_field = policy_metadata

    def metadata(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return (
            self._policy_field or policy_field(self.policy, self.quota, self.window),
            remaining_field(self.policy, self.remaining, self.reset),
        )

    @property
    def near_exhaustion(self) -> bool:
        return near_exhaustion(self.remaining, self.quota)


class RateLimited(ResourceExhausted):
    """A refusal by the limiter: RetryInfo, ``retry-after`` and ``grpc-retry-pushback-ms``;
    ``allowance`` (``r=0``) goes in the answer's initial metadata and trailers."""

    def __init__(self, message: str, *, retry_after: float, allowance: Allowance) -> None:
        super().__init__(message, retry_after=retry_after, reason="RATE_LIMITED")
        self.allowance = allowance


class _Bucket:
    __slots__ = ("limiter", "policy", "policy_field", "quota", "rate", "seen", "spec", "window")

    def __init__(self, spec: RateLimitSettings, now: float, policy: str) -> None:
        self.spec = spec
        self.limiter = AsyncLimiter(spec.capacity, spec.capacity / spec.rate)
        self.seen = now
        self.policy = policy
        self.rate = spec.rate
        self.quota = int(spec.capacity)
        self.window = spec.capacity / spec.rate
        self.policy_field = policy_field(policy, self.quota, self.window)


class RateLimiter:
    """Limits per peer, changeable at run time; counts refusals per peer for the stats."""

    def __init__(
        self,
        default: RateLimitSettings | None,
        overrides: dict[str, RateLimitSettings] | None = None,
        *,
        table_size: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedLimit | None = None,
    ) -> None:
        self.shared = shared
        self.fail_open_calls = 0
        """Calls decided by a local bucket because the shared store was down."""
        self.default = default
        self.overrides: dict[str, RateLimitSettings] = dict(overrides or {})
        self._table_size = table_size
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._until_sweep = SWEEP_EVERY
        self.refused_total = 0
        self.refusals: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.default is not None or bool(self.overrides)

    def __len__(self) -> int:
        return len(self._buckets)

    def _spec(self, peer: str) -> RateLimitSettings | None:
        return self.overrides.get(peer, self.default)

    async def admit(self, peer: str) -> Allowance | None:
        """Take one token for ``peer``; ``None`` when the peer has no limit. Raises
        ``RateLimited`` (with RetryInfo and ``retry-after``) at once when empty."""
        shared = self.shared
        if shared is not None:
            spec = self.overrides.get(peer, self.default)
            if spec is None:
                return None
            if shared.usable():
                policy = OVERRIDE_POLICY if peer in self.overrides else DEFAULT_POLICY
                quota, window = int(spec.capacity), spec.capacity / spec.rate
                try:
                    grant = await shared.admit(peer, spec)
                except Refusal as refusal:
                    self._refuse(peer)
                    raise RateLimited(
                        f"rate limit of {spec.rate:g}/s exceeded for this client",
                        retry_after=max(refusal.retry_after, 0.001),
                        allowance=Allowance(
                            policy,
                            quota,
                            window,
                            0,
                            refusal.retry_after + (spec.capacity - 1) / spec.rate,
                        ),
                    ) from None
                except StoreDown:
                    pass
                else:
                    return Allowance(
                        policy,
                        quota,
                        window,
                        grant.remaining,
                        max(0.0, spec.capacity - grant.remaining) / spec.rate,
                    )
            self.fail_open_calls += 1
        return self._admit_locally(peer)

    def _admit_locally(self, peer: str) -> Allowance | None:
        now = self._clock()
        bucket = self._buckets.get(peer)
        if bucket is None:
            spec = self._spec(peer)
            if spec is None:
                return None
            policy = OVERRIDE_POLICY if peer in self.overrides else DEFAULT_POLICY
            bucket = self._buckets[peer] = _Bucket(spec, now, policy)
            if len(self._buckets) > self._table_size:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
            bucket.seen = now
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self._sweep(now)
        limiter = bucket.limiter
        capacity = limiter.max_rate
        rate = bucket.rate
        if not limiter.has_capacity(1):
            self._refuse(peer)
            # aiolimiter has no public reading of the bucket's level.
            level = limiter._level
            raise RateLimited(
                f"rate limit of {rate:g}/s exceeded for this client",
                retry_after=max((level + 1 - capacity) / rate, 0.001),
                allowance=Allowance(
                    bucket.policy, bucket.quota, bucket.window, 0, level / rate, bucket.policy_field
                ),
            )
        # What ``acquire(1)`` does once ``has_capacity`` said yes, without its second leak
        # (a second clock read) and its coroutine: nobody ever waits in these buckets.
        level = limiter._level = limiter._level + 1
        remaining = capacity - level
        return Allowance(
            bucket.policy,
            bucket.quota,
            bucket.window,
            int(remaining) if remaining > 0 else 0,
            level / rate,
            bucket.policy_field,
        )

    def _refuse(self, peer: str) -> None:
        self.refused_total += 1
        refusals = self.refusals
        refusals[peer] = refusals.get(peer, 0) + 1
        if len(refusals) > REFUSAL_TABLE_SIZE:
            # Keep the heaviest half: the top N asked for is far smaller than the table.
            keep = heapq.nlargest(REFUSAL_TABLE_SIZE // 2, refusals.items(), key=lambda kv: kv[1])
            self.refusals = dict(keep)

    def _sweep(self, now: float) -> None:
        """Drop buckets idle long enough to have refilled (oldest first, so stop early)."""
        self._until_sweep = SWEEP_EVERY
        buckets = self._buckets
        while buckets:
            peer, bucket = next(iter(buckets.items()))
            refill = bucket.spec.capacity / bucket.spec.rate
            if now - bucket.seen <= refill:
                break
            del buckets[peer]

    def top_refused(self, count: int) -> list[tuple[str, int]]:
        return heapq.nlargest(count, self.refusals.items(), key=lambda kv: kv[1])

    def configure(
        self,
        *,
        default: RateLimitSettings | None = None,
        disable: bool = False,
        upsert: dict[str, RateLimitSettings] | None = None,
        remove: tuple[str, ...] = (),
    ) -> None:
        """Change limits at run time; buckets of peers whose limit changed start afresh."""
        if self.shared is not None:
            self.shared.forget()
        if disable:
            self.default = None
            self.overrides.clear()
            self._buckets.clear()
            return
        if default is not None:
            self.default = default
            self._buckets.clear()
        for client, spec in (upsert or {}).items():
            self.overrides[client] = spec
            self._buckets.pop(client, None)
        for client in remove:
            self.overrides.pop(client, None)
            self._buckets.pop(client, None)
