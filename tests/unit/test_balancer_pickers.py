"""Picking policies, without sockets."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from hashmesh.balancer.pickers import (
    ConsistentHash,
    LeastConnections,
    P2cEwma,
    RoundRobin,
    make_picker,
)


@dataclass(eq=False)
class Fake:
    address: str
    in_flight: int = 0
    ewma: float = 0.01
    cap: int = 100

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.cap


def replicas(n: int = 3) -> list[Fake]:
    return [Fake(f"10.0.0.{i}:50051") for i in range(n)]


def test_round_robin_spreads_evenly_and_skips_full_and_excluded() -> None:
    ready = replicas()
    picker = RoundRobin()
    counts = Counter(picker.pick(ready, None, ()).address for _ in range(300))  # type: ignore[union-attr]
    assert set(counts.values()) == {100}
    ready[1].in_flight = ready[1].cap
    picks = {picker.pick(ready, None, (ready[0],)).address for _ in range(10)}  # type: ignore[union-attr]
    assert picks == {ready[2].address}
    ready[2].in_flight = ready[2].cap
    assert picker.pick(ready, None, (ready[0],)) is None


def test_least_connections_prefers_fewest_in_flight_and_spreads_ties() -> None:
    ready = replicas()
    ready[0].in_flight, ready[1].in_flight, ready[2].in_flight = 5, 1, 3
    picker = LeastConnections()
    assert picker.pick(ready, None, ()) is ready[1]
    assert picker.pick(ready, None, (ready[1],)) is ready[2]
    idle = replicas()
    assert len({picker.pick(idle, None, ()).address for _ in range(6)}) == 3  # type: ignore[union-attr]
    assert picker.pick([], None, ()) is None


def test_p2c_ewma_avoids_the_slow_replica() -> None:
    ready = replicas()
    ready[0].ewma = 1.0
    picker = P2cEwma(random.Random(7))
    counts = Counter(picker.pick(ready, None, ()).address for _ in range(600))  # type: ignore[union-attr]
    # The slow one only wins when both choices are... never: it is always the costlier.
    assert counts[ready[0].address] == 0
    assert picker.pick(ready[:1], None, ()) is ready[0]
    ready[1].in_flight = ready[1].cap
    assert picker.pick(ready[1:2], None, ()) is None


def test_consistent_hash_is_sticky_and_moves_only_the_lost_replicas_keys() -> None:
    ready = replicas(4)
    picker = ConsistentHash()
    keys = [f"client-{i}" for i in range(400)]
    before = {k: picker.pick(ready, k, ()).address for k in keys}  # type: ignore[union-attr]
    assert before == {k: picker.pick(ready, k, ()).address for k in keys}  # type: ignore[union-attr]
    assert len(set(before.values())) == 4
    gone = ready.pop(2)
    after = {k: picker.pick(ready, k, ()).address for k in keys}  # type: ignore[union-attr]
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone.address for k in moved)
    # Full replica: the next one on the ring; no key: least connections.
    owner = next(r for r in ready if r.address == after["client-1"])
    owner.in_flight = owner.cap
    assert picker.pick(ready, "client-1", ()) not in (None, owner)
    assert picker.pick(ready, None, ()) is not None


def test_make_picker_knows_every_strategy() -> None:
    for name in ("round_robin", "least_connections", "p2c_ewma", "consistent_hash"):
        assert make_picker(name).name == name
    with pytest.raises(ValueError):
        make_picker("random")
