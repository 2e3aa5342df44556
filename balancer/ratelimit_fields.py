"""How a rate limit is told to the client: the IETF RateLimit fields, as gRPC metadata.

draft-ietf-httpapi-ratelimit-headers (-09 and later) defines two fields, each a Structured
Fields list of one item per policy (RFC 8941):

- ``ratelimit-policy: "default";q=20;w=2`` — the policy: a quota of ``q`` calls per window of
  ``w`` seconds. For hashmesh's token bucket ``q`` is the burst and ``w`` the seconds the bucket
  takes to refill from empty (rounded up), so the sustained rate is about ``q/w``.
- ``ratelimit: "default";r=19;t=1`` — what is left: ``r`` calls may be made at once now, and in
  ``t`` seconds (rounded up) the full quota is back.

The policy is ``"default"`` for the balancer's default limit and ``"client"`` for a per-client
override. Pure formatting: no clock, no sockets."""

from __future__ import annotations

import math

POLICY = "ratelimit-policy"
REMAINING = "ratelimit"
DEFAULT_POLICY = "default"
OVERRIDE_POLICY = "client"


def _seconds(value: float) -> int:
    return max(0, math.ceil(value - 1e-9))


def policy_field(policy: str, quota: int, window_seconds: float) -> tuple[str, str]:
    return (POLICY, f'"{policy}";q={quota};w={max(1, _seconds(window_seconds))}')


def remaining_field(policy: str, remaining: int, reset_seconds: float) -> tuple[str, str]:
    return (REMAINING, f'"{policy}";r={max(0, remaining)};t={_seconds(reset_seconds)}')
