"""One rate limit shared by several balancers through a real redis-server: in-process
limiters on an injected clock, then real balancer processes flooded by one client."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hashmesh.balancer.config import RateLimitSettings
from hashmesh.balancer.ratelimit import RateLimiter
from hashmesh.balancer.shared_limit import SharedLimit, lease_size
from hashmesh.core.errors import ResourceExhausted
from hashmesh.v1 import common_pb2, hash_pb2
from tests.integration.test_balancer_proxy import start_backends, start_balancer
from tests.procs import Proc
from tests.redis_server import RedisServer
from tests.scrape import eventually, scrape, value

HASH = "/hashmesh.v1.HashService/Hash"
REQUEST = hash_pb2.HashRequest(
    algorithm=common_pb2.ALGORITHM_SHA256, data=b"abc"
).SerializeToString()  # type: ignore[arg-type]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.kill()


class Clock:
    """Time that moves only when the test says so (shared by limiters and the Redis script)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limiters(
    url: str, clock: Clock, count: int, spec: RateLimitSettings, *, lease_seconds: float = 0.02
) -> list[RateLimiter]:
    return [
        RateLimiter(
            spec,
            clock=clock,
            shared=SharedLimit.from_url(
                url,
                timeout=1.0,
                lease_seconds=lease_seconds,
                clock=clock,
                store_clock=clock,
                prefix=f"test:{id(clock)}:",
            ),
        )
        for _ in range(count)
    ]


async def _flood_all(
    limiters: list[RateLimiter],
    clock: Clock,
    peer: str,
    seconds: float,
    per_step: int,
    step: float = 0.005,
) -> int:
    """Every limiter gets ``per_step`` calls of ``peer`` every ``step`` of simulated time."""
    admitted = 0
    for _ in range(round(seconds / step)):
        for limiter in limiters:
            for _ in range(per_step):
                try:
                    await limiter.admit(peer)
                    admitted += 1
                except ResourceExhausted:
                    pass
        clock.now += step
    return admitted


async def _close(limiters: list[RateLimiter]) -> None:
    for limiter in limiters:
        assert limiter.shared is not None
        await limiter.shared.close()


@pytest.mark.parametrize("lease_seconds", [0.02, 0.2])
def test_three_balancers_sharing_50_per_second_admit_50_per_second_in_total(
    redis_server: RedisServer, lease_seconds: float
) -> None:
    async def scenario() -> None:
        clock = Clock()
        spec = RateLimitSettings(rate=50, burst=20)
        limiters = _limiters(redis_server.url, clock, 3, spec, lease_seconds=lease_seconds)
        try:
            # 3 x 400 calls/s offered for 4 s: 24 times the limit.
            admitted = await _flood_all(limiters, clock, "flooder", 4.0, per_step=2)
            expected = 20 + 50 * 4.0
            assert abs(admitted - expected) <= 0.1 * expected, (admitted, expected)
            assert (
                sum(limiter.refused_total for limiter in limiters) == 3 * 2 * 800 - admitted
            )  # every call decided, none lost
            # Another client, sharing nothing with the flooder, gets its burst, less at most
            # the tokens the two other processes hold leased.
            polite = 0
            for i in range(20):
                try:
                    await limiters[i % 3].admit("polite")
                    polite += 1
                except ResourceExhausted:
                    pass
            assert polite >= 20 - 2 * lease_size(spec, lease_seconds), polite
            assert all(limiter.fail_open_calls == 0 for limiter in limiters)
        finally:
            await _close(limiters)

    asyncio.run(scenario())


def test_redis_down_fails_open_to_local_limits_then_shares_again(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        clock = Clock()
        spec = RateLimitSettings(rate=50, burst=20)
        limiters = _limiters(redis_server.url, clock, 2, spec)
        try:
            assert await _flood_all(limiters, clock, "c", 1.0, per_step=2) <= 1.1 * (20 + 50)
            redis_server.kill()
            # Each process now limits alone, with the whole limit: its own burst of 20 (the
            # local buckets run on the event loop's real clock, which refills them a little).
            real_start = time.monotonic()
            admitted = await _flood_all(limiters, clock, "c", 1.0, per_step=2)
            real_elapsed = time.monotonic() - real_start
            assert 2 * 20 <= admitted <= 2 * (20 + 50 * real_elapsed) + 2, (admitted, real_elapsed)
            assert all(not limiter.shared.up for limiter in limiters if limiter.shared)
            # (a few calls are still refused from the last answer, until the next token was due)
            assert all(limiter.fail_open_calls >= 390 for limiter in limiters), [
                limiter.fail_open_calls for limiter in limiters
            ]
            assert all(limiter.shared.failures == 1 for limiter in limiters if limiter.shared)

            redis_server.start()  # same port
            clock.now += 1.5  # past the retry interval: the next call starts a check
            for limiter in limiters:
                with contextlib.suppress(ResourceExhausted):  # the local bucket may be empty
                    await limiter.admit("c")
            deadline = time.monotonic() + 10
            while not all(limiter.shared.up for limiter in limiters if limiter.shared):
                assert time.monotonic() < deadline, "the limiters never saw Redis come back"
                await asyncio.sleep(0.02)
            before = [limiter.fail_open_calls for limiter in limiters]
            assert await _flood_all(limiters, clock, "c", 1.0, per_step=2) <= 1.1 * (20 + 50)
            assert [limiter.fail_open_calls for limiter in limiters] == before
        finally:
            await _close(limiters)

    asyncio.run(scenario())


# -- real balancer processes --------------------------------------------------------------------


async def _flood(addresses: list[str], per_second: float, seconds: float) -> tuple[int, int, float]:
    """One client, ``x-client-id: flooder``, sending ``per_second`` to each balancer."""
    accepted = refused = 0
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    try:
        calls = [channel.unary_unary(HASH) for channel in channels]

        async def one(index: int) -> None:
            nonlocal accepted, refused
            try:
                await calls[index](REQUEST, timeout=20, metadata=(("x-client-id", "flooder"),))
                accepted += 1
            except grpc.aio.AioRpcError as err:
                assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err
                refused += 1

        tasks = []
        sent = 0
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            while sent < elapsed * per_second:
                sent += 1
                tasks.extend(asyncio.create_task(one(i)) for i in range(len(calls)))
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started
        await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    return accepted, refused, elapsed


def test_balancer_processes_share_one_limit_and_fail_open_when_redis_dies(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    backends = start_backends(tmp_path, 2)
    balancers: list[Proc] = []
    try:
        for _ in range(3):
            # A burst of one second's worth: a client stalled by a busy machine for less than
            # that loses no tokens, so the count depends on the limit, not on the machine.
            balancers.append(
                start_balancer(
                    tmp_path,
                    backends,
                    "--rate-limit",
                    "50/50",
                    "--redis-url",
                    redis_server.url,
                    "--metrics-port",
                    "0",
                )
            )
        addresses = [b.addresses["balancer"] for b in balancers]
        accepted, refused, elapsed = asyncio.run(_flood(addresses, 100, 3.0))
        expected = 50 + 50 * elapsed
        assert abs(accepted - expected) <= 0.1 * expected, (accepted, expected)
        assert refused > accepted

        redis_server.kill()
        accepted, refused, elapsed = asyncio.run(_flood(addresses, 40, 1.5))
        # Calls keep flowing under local limits: each process admits 50/s of its own, so 3 x 40/s
        # (above the shared 50/s) passes, bar a few refused when a stalled client sends in bunches.
        assert accepted >= 0.8 * (accepted + refused) and accepted > 50 + 50 * elapsed, (
            accepted,
            refused,
        )
        for balancer in balancers:
            samples = eventually(
                lambda b=balancer: scrape(b.addresses["balancer metrics"]),
                lambda s: value(s, "hashmesh_balancer_shared_limit_up") == 0.0,
            )
            assert value(samples, "hashmesh_balancer_shared_limit_up") == 0.0
            assert (value(samples, "hashmesh_balancer_shared_limit_fail_open_calls_total") or 0) > 0
    finally:
        for proc in (*balancers, *backends):
            proc.terminate()


def test_a_redis_that_never_answers_leaves_local_limits_in_force(tmp_path: Path) -> None:
    from tests.redis_server import free_port

    async def scenario() -> None:
        clock = Clock()
        spec = RateLimitSettings(rate=1, burst=5)
        (limiter,) = _limiters(f"redis://127.0.0.1:{free_port()}/0", clock, 1, spec)
        try:
            admitted = 0
            for _ in range(20):
                try:
                    await limiter.admit("c")
                    admitted += 1
                except ResourceExhausted:
                    pass
            assert limiter.shared is not None and not limiter.shared.up
            assert 5 <= admitted <= 6 and limiter.fail_open_calls == 20  # the local burst of 5
        finally:
            await _close([limiter])

    asyncio.run(scenario())
