"""``hashctl cache stats`` across the mesh: each replica counts its own lookups, so the mesh's
figures are the sum over replicas, except the shared tier's size (one table, seen alike by
every replica). Pure functions over the replies; the calls are in ``hashmesh.cli.admin_cmds``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hashmesh.cli.naming import cache_tier_name
from hashmesh.v1 import cache_pb2

COUNTERS = ("hits", "misses", "entries", "evictions", "errors")


def tier_rows(reply: cache_pb2.GetCacheStatsResponse) -> list[dict[str, Any]]:
    return [
        {"tier": cache_tier_name(t.tier), **{name: getattr(t, name) for name in COUNTERS}}
        for t in reply.tiers
    ]


def merge(replies: Sequence[cache_pb2.GetCacheStatsResponse]) -> list[dict[str, Any]]:
    """One row per tier for the whole mesh, in the order the first reply lists them."""
    merged: dict[str, dict[str, Any]] = {}
    for reply in replies:
        for row in tier_rows(reply):
            total = merged.setdefault(
                row["tier"], {"tier": row["tier"], **dict.fromkeys(COUNTERS, 0)}
            )
            for name in COUNTERS:
                if row["tier"] == "shared" and name == "entries":
                    total[name] = max(total[name], row[name])  # the same rows, not more of them
                else:
                    total[name] += row[name]
    return list(merged.values())
