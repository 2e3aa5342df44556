"""Queued work in cost units and priority caps (core.tasks.limits), with an in-memory count."""

from __future__ import annotations

import asyncio

import pytest

from hashmesh.core.errors import InvalidArgument, ResourceExhausted
from hashmesh.core.queue.limits import TASK_OVERHEAD_COST, PendingLimits, PriorityCaps, task_cost


def test_cost_of_argon2_and_digests() -> None:
    assert (
        task_cost("argon2id", {"time_cost": 3, "memory_cost_kib": 65536}, 10)
        == 3 * 64 * 2**20 + TASK_OVERHEAD_COST
    )
    assert task_cost("sha256", {}, 1000) == 1000 + TASK_OVERHEAD_COST
    assert task_cost("md5", {}, 0) == TASK_OVERHEAD_COST


def test_cost_adds_up_per_client_until_the_refresh_counts_it() -> None:
    costs = {"a": 0}

    async def count() -> dict[str, int]:
        return {}

    async def cost() -> dict[str, int]:
        return dict(costs)

    async def scenario() -> None:
        limits = PendingLimits(
            max_total=100,
            max_per_client=100,
            count=count,
            cost=cost,
            max_cost_total=1000,
            max_cost_per_client=500,
            refresh_seconds=3600,
        )
        await limits.admit("a", 1, 400)
        limits.accepted("a", 1, 400)
        with pytest.raises(ResourceExhausted) as refused:
            await limits.admit("a", 1, 200)
        assert refused.value.reason == "CLIENT_QUEUE_FULL"
        await limits.admit("b", 1, 450)  # another client has its own budget
        limits.accepted("b", 1, 450)
        with pytest.raises(ResourceExhausted) as total:
            await limits.admit("c", 1, 200)
        assert total.value.reason == "QUEUE_FULL"

    asyncio.run(scenario())


def test_priority_caps_come_from_configuration() -> None:
    caps = PriorityCaps(10, {"ops": 100})
    caps.check("anyone", 10, "spec.priority")
    caps.check("ops", 100, "spec.priority")
    with pytest.raises(InvalidArgument) as refused:
        caps.check("anyone", 11, "specs[3].priority")
    assert refused.value.field == "specs[3].priority"
