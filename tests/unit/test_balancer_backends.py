"""Replica states: passive ejection, drain, panic routing, serving signal (no sockets used)."""

from __future__ import annotations

import asyncio

from hashmesh.balancer.backends import EJECTED, READY, UNHEALTHY, BackendSet, Replica
from hashmesh.balancer.config import BalancerSettings


def test_ejection_drain_and_panic_routing() -> None:
    async def scenario() -> None:
        serving: list[bool] = []
        settings = BalancerSettings(
            backends=("10.0.0.1:1", "10.0.0.2:1"), eject_after=3, strategy="round_robin"
        )
        backends = BackendSet(settings, on_change=serving.append)
        first, second = (Replica(a, "static", settings) for a in settings.backends)
        backends.replicas = {first.address: first, second.address: second}
        for replica in (first, second):
            backends._set_state(replica, READY)
        assert serving == [True] and set(backends.ready) == {first, second}

        for _ in range(2):
            backends.connection_failed(first)
        assert first.state == READY  # two failures in a row are not enough
        backends.connection_failed(first)
        assert first.state == EJECTED and first.stats.ejections == 1
        assert {backends.pick(None, ()) for _ in range(4)} == {second}

        backends.drain(second.address)
        assert second.shown_state == "draining" and backends.ready == ()
        # Nothing ready: panic routing tries what is not drained rather than refusing.
        assert backends.pick(None, ()) is first
        backends.drain(second.address, undrain=True)
        backends._set_state(second, UNHEALTHY)
        backends._set_state(first, UNHEALTHY)
        assert serving == [True, False]
        assert backends.pick(None, ()) in (first, second)
        second.in_flight = second.cap
        first.in_flight = first.cap
        assert backends.pick(None, ()) is None  # every replica full: the proxy fails fast
        backends.set_strategy("consistent_hash", "X-Shard")
        assert backends.picker.name == "consistent_hash" and backends.hash_key == "x-shard"
        await asyncio.gather(first.channel.close(), second.channel.close())

    asyncio.run(scenario())
