"""Picking policies: which replica takes the next call. Pure logic, no grpc, no I/O.

A picker gets the ready replicas (a tuple that changes only when a replica changes state) and
returns one that has room, or ``None`` when every one is full or excluded. Pickers keep no
per-call state beyond a counter or a ring, so swapping one for another at run time leaves
calls in flight alone: they already hold their replica."""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Collection, Sequence
from typing import Protocol


class Candidate(Protocol):
    """What a picker may read about a replica."""

    @property
    def address(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def ewma(self) -> float: ...

    @property
    def has_room(self) -> bool: ...


class Picker(Protocol):
    name: str

    def pick(
        self, ready: Sequence[Candidate], key: str | None, exclude: Collection[Candidate]
    ) -> Candidate | None: ...


class RoundRobin:
    """Each call goes to the next ready replica in turn, skipping full ones."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(
        self, ready: Sequence[Candidate], key: str | None, exclude: Collection[Candidate]
    ) -> Candidate | None:
        count = len(ready)
        start = self._next
        for step in range(count):
            candidate = ready[(start + step) % count]
            if candidate.has_room and candidate not in exclude:
                self._next = (start + step + 1) % count
                return candidate
        return None


class LeastConnections:
    """The replica with the fewest calls in flight; ties go round robin so that an idle mesh
    still spreads calls."""

    name = "least_connections"

    def __init__(self) -> None:
        self._offset = 0

    def pick(
        self, ready: Sequence[Candidate], key: str | None, exclude: Collection[Candidate]
    ) -> Candidate | None:
        count = len(ready)
        self._offset = offset = (self._offset + 1) % count if count else 0
        best: Candidate | None = None
        best_load = 1 << 62
        for step in range(count):
            candidate = ready[(offset + step) % count]
            load = candidate.in_flight
            if load < best_load and candidate.has_room and candidate not in exclude:
                best, best_load = candidate, load
        return best


class P2cEwma:
    """Power of two choices: of two random ready replicas, the one with the lower EWMA latency
    weighted by its calls in flight (Finagle's and Linkerd's peak-EWMA cost)."""

    name = "p2c_ewma"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    @staticmethod
    def cost(candidate: Candidate) -> float:
        return candidate.ewma * (candidate.in_flight + 1)

    def pick(
        self, ready: Sequence[Candidate], key: str | None, exclude: Collection[Candidate]
    ) -> Candidate | None:
        usable = (
            [c for c in ready if c.has_room and c not in exclude]
            if exclude
            else [c for c in ready if c.has_room]
        )
        if len(usable) < 2:
            return usable[0] if usable else None
        first, second = self._rng.sample(usable, 2)
        return first if self.cost(first) <= self.cost(second) else second


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class ConsistentHash:
    """Calls with the same key go to the same replica while it is ready (cache affinity); a
    replica leaving moves only its own keys. Calls without the key use least connections."""

    name = "consistent_hash"

    def __init__(self, hash_key: str = "x-client-id", vnodes: int = 64) -> None:
        self.hash_key = hash_key
        self._vnodes = vnodes
        self._ring_for: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []
        self._fallback = LeastConnections()

    def _ring(self, ready: Sequence[Candidate]) -> None:
        addresses = tuple(sorted(c.address for c in ready))
        if addresses == self._ring_for:
            return
        ring = sorted(
            (_point(f"{address}#{v}"), address)
            for address in addresses
            for v in range(self._vnodes)
        )
        self._points = [point for point, _ in ring]
        self._owners = [address for _, address in ring]
        self._ring_for = addresses

    def pick(
        self, ready: Sequence[Candidate], key: str | None, exclude: Collection[Candidate]
    ) -> Candidate | None:
        if key is None or not ready:
            return self._fallback.pick(ready, key, exclude)
        self._ring(ready)
        by_address = {c.address: c for c in ready}
        start = bisect.bisect(self._points, _point(key))
        seen: set[str] = set()
        for step in range(len(self._points)):
            address = self._owners[(start + step) % len(self._points)]
            if address in seen:
                continue
            seen.add(address)
            candidate = by_address[address]
            if candidate.has_room and candidate not in exclude:
                return candidate
            if len(seen) == len(by_address):
                break
        return None


def make_picker(name: str, hash_key: str = "x-client-id") -> Picker:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_connections":
        return LeastConnections()
    if name == "p2c_ewma":
        return P2cEwma()
    if name == "consistent_hash":
        return ConsistentHash(hash_key)
    raise ValueError(f"unknown strategy {name!r}")
