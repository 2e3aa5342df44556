"""Budgets: how much one peer, and every peer together, may hold in the balancer at once.

Rate limits count calls per second; a caller that opens calls and keeps them open holds
resources instead: replica slots, streams, buffered request bytes. Each call holds one unit of
its kind — a unary call, an upload stream (client streaming: HashStream), a watch (server
streaming: WatchTask, SubmitAndWatchTask) or another stream (bidirectional, e.g. server reflection, and any method
the balancer does not know) — plus, for a unary call, the bytes of its request, from admission
until it ends. Over a budget the call is refused at once with RESOURCE_EXHAUSTED and RetryInfo:
over the peer's own budget only that peer is refused; the totals bound what all peers hold.

The peer is the caller's identity as ``Identify`` decided it (``CallInfo.client``: the API
key's client, the client a trusted proxy vouches for, else the caller's address), never what
the request says about itself. Peers holding nothing are forgotten, so the table is bounded by
the totals. Pure accounting, no grpc; the proxy calls ``hold`` once per call, AdminService
and the metrics exporter read ``snapshot``."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hashmesh.core.errors import InvalidArgument, ResourceExhausted
from hashmesh.core.settings import SettingsError, env_bool, env_float, env_int

UNARY, UPLOAD, WATCH, OTHER = 0, 1, 2, 3
KIND_KEYS = ("unary_calls", "upload_streams", "watch_streams", "other_streams")
"""Each kind's name in AdminService's fields and the metrics' ``kind`` label."""
BYTES_KEY = "request_bytes"
KIND_NAMES = (
    "unary calls",
    "upload streams (HashStream)",
    "watch streams (WatchTask, SubmitAndWatchTask)",
    "other streams (bidirectional, reflection, unknown methods)",
)
_PEER_ENV = (
    "BALANCER_PEER_CALLS",
    "BALANCER_PEER_UPLOAD_STREAMS",
    "BALANCER_PEER_WATCH_STREAMS",
    "BALANCER_PEER_OTHER_STREAMS",
)
_TOTAL_ENV = (
    "BALANCER_TOTAL_CALLS",
    "BALANCER_TOTAL_UPLOAD_STREAMS",
    "BALANCER_TOTAL_WATCH_STREAMS",
    "BALANCER_TOTAL_OTHER_STREAMS",
)
RETRY_AFTER = 1.0
"""Seconds a refused caller is told to wait: held calls end at their own pace."""
METADATA_ENTRY_OVERHEAD = 32
"""Bytes counted per metadata entry besides key and value, as HTTP/2 (RFC 7541 §4.1) does."""


@dataclass(frozen=True)
class BudgetSettings:
    """Per-peer and total budgets (environment variables with the ``HASHMESH_`` prefix)."""

    enabled: bool = True
    """Count and refuse at all (``BALANCER_BUDGETS``); off only to measure their cost."""
    peer_calls: int = 256
    """Unary calls one peer may have in flight (``BALANCER_PEER_CALLS``)."""
    total_calls: int = 4096
    """Unary calls in flight from all peers (``BALANCER_TOTAL_CALLS``)."""
    peer_upload_streams: int = 64
    """Client-streaming calls (HashStream) one peer may hold (``BALANCER_PEER_UPLOAD_STREAMS``)."""
    total_upload_streams: int = 1024
    """Client-streaming calls from all peers (``BALANCER_TOTAL_UPLOAD_STREAMS``)."""
    peer_watch_streams: int = 256
    """Server-streaming calls (WatchTask, SubmitAndWatchTask) one peer may hold
    (``BALANCER_PEER_WATCH_STREAMS``)."""
    total_watch_streams: int = 4096
    """Server-streaming calls from all peers (``BALANCER_TOTAL_WATCH_STREAMS``)."""
    peer_other_streams: int = 32
    """Bidirectional calls (reflection, unknown methods) one peer may hold
    (``BALANCER_PEER_OTHER_STREAMS``)."""
    total_other_streams: int = 512
    """Bidirectional calls from all peers (``BALANCER_TOTAL_OTHER_STREAMS``)."""
    peer_bytes: int = 64 * 1024 * 1024
    """Bytes of unary requests one peer may have in flight (``BALANCER_PEER_BYTES``)."""
    total_bytes: int = 512 * 1024 * 1024
    """Bytes of unary requests in flight from all peers (``BALANCER_TOTAL_BYTES``)."""
    stream_idle_seconds: float = 30.0
    """A client stream (HashStream, bidirectional) that sends no message for this long ends
    with DEADLINE_EXCEEDED; 0 turns the limit off (``BALANCER_STREAM_IDLE_SECONDS``)."""
    max_metadata_bytes: int = 16 * 1024
    """Largest request metadata forwarded (keys + values + 32 per entry); more is refused with
    INVALID_ARGUMENT (``BALANCER_MAX_METADATA_BYTES``)."""

    def __post_init__(self) -> None:
        if min(self.peer_caps + self.total_caps + (self.peer_bytes, self.total_bytes)) < 1:
            raise SettingsError(
                "HASHMESH_BALANCER_PEER_* and HASHMESH_BALANCER_TOTAL_* budgets must be >= 1"
            )
        if self.stream_idle_seconds < 0:
            raise SettingsError("HASHMESH_BALANCER_STREAM_IDLE_SECONDS must be >= 0")
        if self.max_metadata_bytes < 1024:
            raise SettingsError("HASHMESH_BALANCER_MAX_METADATA_BYTES must be >= 1024")

    @property
    def peer_caps(self) -> tuple[int, int, int, int]:
        return (
            self.peer_calls,
            self.peer_upload_streams,
            self.peer_watch_streams,
            self.peer_other_streams,
        )

    @property
    def total_caps(self) -> tuple[int, int, int, int]:
        return (
            self.total_calls,
            self.total_upload_streams,
            self.total_watch_streams,
            self.total_other_streams,
        )

    @classmethod
    def from_env(cls) -> BudgetSettings:
        d = cls()
        return cls(
            enabled=env_bool("BALANCER_BUDGETS", d.enabled),
            peer_calls=env_int("BALANCER_PEER_CALLS", d.peer_calls),
            total_calls=env_int("BALANCER_TOTAL_CALLS", d.total_calls),
            peer_upload_streams=env_int("BALANCER_PEER_UPLOAD_STREAMS", d.peer_upload_streams),
            total_upload_streams=env_int("BALANCER_TOTAL_UPLOAD_STREAMS", d.total_upload_streams),
            peer_watch_streams=env_int("BALANCER_PEER_WATCH_STREAMS", d.peer_watch_streams),
            total_watch_streams=env_int("BALANCER_TOTAL_WATCH_STREAMS", d.total_watch_streams),
            peer_other_streams=env_int("BALANCER_PEER_OTHER_STREAMS", d.peer_other_streams),
            total_other_streams=env_int("BALANCER_TOTAL_OTHER_STREAMS", d.total_other_streams),
            peer_bytes=env_int("BALANCER_PEER_BYTES", d.peer_bytes),
            total_bytes=env_int("BALANCER_TOTAL_BYTES", d.total_bytes),
            stream_idle_seconds=env_float("BALANCER_STREAM_IDLE_SECONDS", d.stream_idle_seconds),
            max_metadata_bytes=env_int("BALANCER_MAX_METADATA_BYTES", d.max_metadata_bytes),
        )


@dataclass(frozen=True)
class PeerHolding:
    """What one peer holds now: calls or streams per kind, and unary request bytes."""

    peer: str
    counts: tuple[int, ...]
    bytes: int


@dataclass(frozen=True)
class BudgetSnapshot:
    """What all peers hold now, the limits it is held against, and the heaviest holders."""

    enabled: bool
    in_use: tuple[int, ...]
    """Per kind (``UNARY`` … ``OTHER``), from every peer."""
    bytes: int
    limits: BudgetSettings
    refused: int
    """Calls refused as over a budget since the balancer started."""
    top: Sequence[PeerHolding]
    """Peers holding the most calls and streams (all kinds together), most first."""


class OverBudget(ResourceExhausted):
    """A refusal by a budget; ``reason`` says whose: the peer's or the balancer's."""


class _Use:
    __slots__ = ("bytes", "counts", "held")

    def __init__(self) -> None:
        self.counts = [0, 0, 0, 0]
        self.bytes = 0
        self.held = 0


class Budgets:
    """What each peer holds now, and all of them together."""

    def __init__(self, settings: BudgetSettings) -> None:
        self.settings = settings
        self._peer_caps = settings.peer_caps
        self._total_caps = settings.total_caps
        self._peer_bytes = settings.peer_bytes
        self._total_bytes = settings.total_bytes
        self._max_metadata = settings.max_metadata_bytes
        self._enabled = settings.enabled
        self.totals = [0, 0, 0, 0]
        self.bytes = 0
        self.refused = 0
        self._peers: dict[str, _Use] = {}

    def __len__(self) -> int:
        """Peers holding something now."""
        return len(self._peers)

    def held_by(self, peer: str) -> tuple[int, ...]:
        use = self._peers.get(peer)
        return tuple(use.counts) if use is not None else (0, 0, 0, 0)

    def snapshot(self, top: int) -> BudgetSnapshot:
        """The totals and the ``top`` heaviest peers (none for ``top=0``, which only copies
        integers: the metrics exporter reads it from the scrape thread). O(peers held), and
        the peers held are bounded by the totals."""
        heaviest = (
            heapq.nlargest(top, self._peers.items(), key=lambda kv: (kv[1].held, kv[1].bytes))
            if top > 0
            else []
        )
        return BudgetSnapshot(
            enabled=self._enabled,
            in_use=tuple(self.totals),
            bytes=self.bytes,
            limits=self.settings,
            refused=self.refused,
            top=[PeerHolding(peer, tuple(use.counts), use.bytes) for peer, use in heaviest],
        )

    def take(self, peer: str, kind: int, size: int = 0) -> None:
        """Count one call of ``kind`` (with ``size`` request bytes) for ``peer``, or raise
        ``OverBudget`` and count nothing."""
        if self.totals[kind] >= self._total_caps[kind]:
            raise self._refused(
                f"the balancer holds {self.totals[kind]} {KIND_NAMES[kind]}, its limit "
                f"(HASHMESH_{_TOTAL_ENV[kind]})",
                "BALANCER_BUDGET_EXCEEDED",
            )
        use = self._peers.get(peer)
        if use is not None and use.counts[kind] >= self._peer_caps[kind]:
            raise self._refused(
                f"this client holds {use.counts[kind]} {KIND_NAMES[kind]}, the limit per "
                f"client (HASHMESH_{_PEER_ENV[kind]})",
                "PEER_BUDGET_EXCEEDED",
            )
        if size:
            if self.bytes + size > self._total_bytes:
                raise self._refused(
                    f"the balancer holds {self.bytes} request bytes in flight; the limit is "
                    f"{self._total_bytes} (HASHMESH_BALANCER_TOTAL_BYTES)",
                    "BALANCER_BUDGET_EXCEEDED",
                )
            mine = use.bytes if use is not None else 0
            if mine + size > self._peer_bytes:
                raise self._refused(
                    f"this client has {mine} request bytes in flight; the limit per client is "
                    f"{self._peer_bytes} (HASHMESH_BALANCER_PEER_BYTES)",
                    "PEER_BUDGET_EXCEEDED",
                )
        if use is None:
            use = self._peers[peer] = _Use()
        use.counts[kind] += 1
        use.held += 1
        use.bytes += size
        self.totals[kind] += 1
        self.bytes += size

    def give_back(self, peer: str, kind: int, size: int = 0) -> None:
        use = self._peers[peer]
        use.counts[kind] -= 1
        use.bytes -= size
        use.held -= 1
        self.totals[kind] -= 1
        self.bytes -= size
        if not use.held:
            del self._peers[peer]

    def _refused(self, message: str, reason: str) -> OverBudget:
        self.refused += 1
        return OverBudget(message, retry_after=RETRY_AFTER, reason=reason)

    def hold(
        self,
        peer: str,
        kind: int,
        size: int,
        metadata: Sequence[tuple[str, Any]],
        on_done: Callable[[Callable[[Any], None]], None],
    ) -> None:
        """Check the call's metadata, take its budget, and give it back when the call ends
        (``on_done`` is the call's ``add_done_callback``)."""
        check_metadata(metadata, self._max_metadata)
        if not self._enabled:
            return
        self.take(peer, kind, size)
        on_done(lambda _: self.give_back(peer, kind, size))


def check_metadata(metadata: Sequence[tuple[str, Any]], limit: int) -> None:
    """``InvalidArgument`` for metadata a replica would refuse or choke on: more than ``limit``
    bytes, or a text value that is not printable ASCII (gRPC's rule for non ``-bin`` keys)."""
    total = 0
    for key, value in metadata:
        total += len(key) + len(value) + METADATA_ENTRY_OVERHEAD
        if isinstance(value, str) and not (value.isascii() and value.isprintable()):
            raise InvalidArgument(
                f"metadata[{key[:100]!r}]",
                "a text metadata value must be printable ASCII; "
                "send other bytes under a key ending in -bin",
            )
    if total > limit:
        raise InvalidArgument(
            "metadata",
            f"is {total} bytes; at most {limit} are accepted "
            "(HASHMESH_BALANCER_MAX_METADATA_BYTES)",
        )
