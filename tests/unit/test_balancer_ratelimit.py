"""Per-peer rate limits, API keys, retry budget and settings, without sockets."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from hashmesh.balancer import keys
from hashmesh.balancer.config import BalancerSettings, RateLimitSettings, parse_overrides
from hashmesh.balancer.interceptors import CallInfo, RateLimit
from hashmesh.balancer.proxy import RetryBudget
from hashmesh.balancer.ratelimit import RateLimited, RateLimiter
from hashmesh.core.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    to_grpc_status,
)
from hashmesh.core.settings import SettingsError


class _FrozenTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test says so: aiolimiter's buckets
    read ``loop.time()``, so a test can offer calls at exact instants."""

    now = 0.0

    def time(self) -> float:
        return self.now


def _frozen_time_run(scenario: Callable[[_FrozenTimeLoop], Coroutine[Any, Any, None]]) -> None:
    loop = _FrozenTimeLoop()
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        runner.run(scenario(loop))


def test_flooding_at_ten_times_the_limit_gets_the_limit_and_others_are_unaffected() -> None:
    async def scenario(loop: _FrozenTimeLoop) -> None:
        now = [0.0]
        limiter = RateLimiter(RateLimitSettings(rate=100, burst=10), clock=lambda: now[0])
        flooder = polite = 0
        # 1.5 s in steps of 1 ms: the flooder offers 1000/s, the polite client 50/s.
        for step in range(1500):
            now[0] = loop.now = step / 1000
            try:
                await limiter.admit("flooder")
                flooder += 1
            except ResourceExhausted:
                pass
            if step % 20 == 0:
                await limiter.admit("polite")  # never refused: raises otherwise
                polite += 1
        # The burst, then exactly the rate: 10 + 100/s over the 1.499 s of offers.
        assert 10 + 149 <= flooder <= 10 + 150, flooder
        assert polite == 75
        assert limiter.refused_total == 1500 - flooder
        assert limiter.top_refused(1)[0][0] == "flooder"
        assert "polite" not in limiter.refusals

    _frozen_time_run(scenario)


def test_refusal_is_immediate_with_retry_info_and_headers_count_down() -> None:
    async def scenario() -> None:
        limiter = RateLimiter(
            RateLimitSettings(rate=1, burst=3), {"vip": RateLimitSettings(rate=1000)}
        )
        remaining = []
        for _ in range(3):
            allowance = await limiter.admit("c")
            assert allowance is not None and allowance.quota == 3
            remaining.append(dict(allowance.metadata())["ratelimit"])
        # rate 1/s, burst 3: q=3 per 3 s window; t is the seconds until the bucket is full.
        assert dict(allowance.metadata())["ratelimit-policy"] == '"default";q=3;w=3'
        assert remaining == ['"default";r=2;t=1', '"default";r=1;t=2', '"default";r=0;t=3']
        with pytest.raises(RateLimited) as refused:
            await limiter.admit("c")
        status = to_grpc_status(refused.value)
        keys_ = dict(status.trailing_metadata)
        assert "grpc-status-details-bin" in keys_ and keys_["retry-after"] == "1"
        assert 0 < int(keys_["grpc-retry-pushback-ms"]) <= 1000
        assert dict(refused.value.allowance.metadata())["ratelimit"].startswith('"default";r=0;')
        vip = await limiter.admit("vip")
        assert vip is not None and vip.quota == 1000 and vip.policy == "client"
        limiter.configure(upsert={"c": RateLimitSettings(rate=50, burst=50)})
        assert (await limiter.admit("c")).remaining == 49  # type: ignore[union-attr]
        limiter.configure(disable=True)
        assert await limiter.admit("c") is None and not limiter.enabled

    asyncio.run(scenario())


def test_unary_headers_carry_the_fields_only_near_exhaustion_unless_always() -> None:
    async def scenario() -> None:
        # One call per 1,000 s: no token comes back while the test runs.
        limiter = RateLimiter(RateLimitSettings(rate=0.001, burst=4))
        near, always = RateLimit(limiter), RateLimit(limiter, always_in_headers=True)
        answers = []
        for interceptor, client in ((near, "a"),) * 4 + ((always, "b"),):
            call = CallInfo("/m", "ipv4:127.0.0.1:1")
            call.client = client
            await interceptor.admit(call)
            remaining = dict(call.ratelimit)["ratelimit"].split(";")[1]
            answers.append(
                (remaining, call.unary_headers == call.ratelimit, bool(call.unary_headers))
            )
        # Half the burst (2 of 4) or less left: near exhaustion.
        assert answers == [
            ("r=3", False, False),
            ("r=2", True, True),
            ("r=1", True, True),
            ("r=0", True, True),
            ("r=3", True, True),  # always: far from exhaustion too
        ]
        call = CallInfo("/m", "ipv4:127.0.0.1:1")
        call.client = "a"
        with pytest.raises(RateLimited):
            await near.admit(call)
        assert dict(call.ratelimit)["ratelimit"].startswith('"default";r=0;')

    asyncio.run(scenario())


def test_ratelimit_headers_setting_is_near_or_always(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BalancerSettings().ratelimit_headers == "near"
    monkeypatch.setenv("HASHMESH_BALANCER_RATELIMIT_HEADERS", "Always")
    assert BalancerSettings.from_env().ratelimit_headers == "always"
    monkeypatch.setenv("HASHMESH_BALANCER_RATELIMIT_HEADERS", "sometimes")
    with pytest.raises(SettingsError, match="HASHMESH_BALANCER_RATELIMIT_HEADERS"):
        BalancerSettings.from_env()


def test_limiter_table_stays_bounded_for_100k_distinct_clients() -> None:
    async def scenario() -> int:
        # A frozen clock: no bucket is idle long enough to be swept, whatever the machine speed.
        limiter = RateLimiter(
            RateLimitSettings(rate=10, burst=10), table_size=20_000, clock=lambda: 0.0
        )
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            await limiter.admit(f"client-{i:06d}")
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert len(limiter) == 20_000
        return grown

    grown = asyncio.run(scenario())
    assert grown < 30 * 1024 * 1024, f"{grown / 1e6:.1f} MB"


def test_idle_buckets_are_evicted_once_refilled() -> None:
    async def scenario() -> None:
        now = [0.0]
        limiter = RateLimiter(RateLimitSettings(rate=100, burst=10), clock=lambda: now[0])
        for i in range(100):
            await limiter.admit(f"old-{i}")
        now[0] = 5.0  # far beyond the 0.1 s refill time
        for i in range(300):
            await limiter.admit(f"new-{i}")
        assert not any(peer.startswith("old-") for peer in limiter._buckets)

    asyncio.run(scenario())


def test_retry_budget_allows_a_fifth_of_calls_plus_a_floor() -> None:
    now = [0.0]
    budget = RetryBudget(0.2, 0.0, clock=lambda: now[0])
    for _ in range(100):
        budget.deposit()
    granted = sum(budget.withdraw() for _ in range(100))
    assert granted == 20
    floor = RetryBudget(0.2, 5.0, clock=lambda: now[0])
    assert sum(floor.withdraw() for _ in range(50)) == 5


def test_api_keys_are_stored_hashed_and_identify_clients(tmp_path: Path) -> None:
    key = keys.generate_key()
    line = keys.key_line("team-a", key)
    assert key not in line and line.startswith("team-a sha256:")
    path = tmp_path / "keys"
    path.write_text(f"# comment\n{line}\n")
    table = keys.ApiKeys(str(path))
    assert table.client_for(key) == "team-a"
    assert table.client_for(key + "x") is None
    with pytest.raises(SettingsError):
        keys.parse("team-a plain-text-key\n")


def test_settings_are_safe_by_default() -> None:
    with pytest.raises(SettingsError):
        BalancerSettings(admin_listen="0.0.0.0:9000")
    assert BalancerSettings(admin_listen="0.0.0.0:9000", admin_token="t").admin_token == "t"
    with pytest.raises(SettingsError):
        BalancerSettings(strategy="random")
    for key in ("Bad Key!", "x-foo-bin", "grpc-timeout", ""):
        with pytest.raises(SettingsError):
            BalancerSettings(hash_key=key)
    assert BalancerSettings(hash_key="x-tenant").hash_key == "x-tenant"
    assert parse_overrides(("a=5/10",))["a"] == RateLimitSettings(5, 10)
    for entry in ("garbage", "127.0.0.1:99999", ":5", "host:", "host:http"):
        with pytest.raises(SettingsError):
            BalancerSettings(backends=(entry,))
    assert BalancerSettings(backends=("hashd:50051", "[::1]:1")).backends[0] == "hashd:50051"
    with pytest.raises(SettingsError):
        parse_overrides(("a",))


def test_rates_the_bucket_cannot_represent_are_refused_and_retry_after_stays_finite() -> None:
    for rate in (float("inf"), float("nan"), 0.0, -1.0, 1e-300, 1e300):
        with pytest.raises(SettingsError):
            RateLimitSettings(rate)
    with pytest.raises(SettingsError):
        parse_overrides(("a=inf",))

    async def scenario() -> None:
        limiter = RateLimiter(RateLimitSettings(rate=1e-3, burst=1))
        await limiter.admit("p")
        with pytest.raises(ResourceExhausted) as refused:
            await limiter.admit("p")
        assert 900 < refused.value.retry_after <= 1000
        to_grpc_status(refused.value)  # a Duration can hold it

    asyncio.run(scenario())


def test_error_messages_and_delays_are_bounded() -> None:
    status = to_grpc_status(
        NotFound(
            f"no replica {'x' * 20_000!r}",
            reason="BACKEND_NOT_FOUND",
            resource_type="hashmesh.v1.Backend",
            resource_name="x" * 20_000,
        )
    )
    assert len(status.details) <= 1000
    assert sum(len(v) for _, v in status.trailing_metadata) < 8192
    invalid = InvalidArgument("address", "y" * 20_000)
    assert len(invalid.description) <= 1000 and len(to_grpc_status(invalid).details) <= 2100
    for delay in (float("inf"), 1e300):
        assert to_grpc_status(ResourceExhausted("slow", retry_after=delay)).code.name == (
            "RESOURCE_EXHAUSTED"
        )
        assert to_grpc_status(Unavailable("down", retry_after=delay)).code.name == "UNAVAILABLE"


def test_shared_limit_leases_are_small_and_its_settings_are_checked() -> None:
    from hashmesh.balancer.shared_limit import lease_size

    assert lease_size(RateLimitSettings(rate=50, burst=20), 0.02) == 1
    assert lease_size(RateLimitSettings(rate=10_000, burst=10_000), 0.02) == 200
    # Never more than a quarter of the burst, so one process cannot take it all at once.
    assert lease_size(RateLimitSettings(rate=10_000, burst=40), 0.02) == 10
    assert lease_size(RateLimitSettings(rate=0.5), 0.02) == 1
    with pytest.raises(SettingsError, match="REDIS_URL"):
        BalancerSettings(redis_url="http://redis:6379")
    with pytest.raises(SettingsError, match="REDIS_TIMEOUT"):
        BalancerSettings(redis_timeout=0)
    assert BalancerSettings(redis_url="redis://127.0.0.1:6379/0").redis_url
