"""How a rate limit is told to the client: the IETF RateLimit fields, as gRPC metadata.

draft-ietf-httpapi-ratelimit-headers (-09 and later) defines two fields, each a Structured
Fields list of one item per policy (RFC 8941):

- ``ratelimit-policy: "default";q=20;w=2`` — the policy: a quota of ``q`` calls per window of
  ``w`` seconds. For hashmesh's token bucket ``q`` is the burst and ``w`` the seconds the bucket
  takes to refill from empty (rounded up), so the sustained rate is about ``q/w``.
- ``ratelimit: "default";r=19;t=1`` — what is left: ``r`` calls may be made at once now, and in
  ``t`` seconds (rounded up) the full quota is back.

The policy is ``"default"`` for the balancer's default limit and ``"client"`` for a per-client
override.

Where they go (the draft's "Performance Considerations" allow both: fields in a trailer
section, and fields only when a quota is close to exhaustion): every answer carries them in its
trailers, which ride grpc's final batch for free; a unary answer carries them in its initial
metadata too only when ``near_exhaustion`` (or with ``HASHMESH_BALANCER_RATELIMIT_HEADERS=always``),
because grpc.aio sends explicit initial metadata as a batch of its own — one more write and
poller trip per call. Refusals and streams carry them in both. Pure formatting: no clock, no
sockets."""

from __future__ import annotations

import math

POLICY = "ratelimit-policy"
REMAINING = "ratelimit"
DEFAULT_POLICY = "default"
OVERRIDE_POLICY = "client"


def near_exhaustion(remaining: int, quota: int) -> bool:
    """Half the burst or less is left: from here on a unary answer's headers carry the fields
    too, so a client reading headers only still sees the limit coming before it is refused."""
    return remaining * 2 <= quota


def _seconds(value: float) -> int:
    return max(0, math.ceil(value - 1e-9))


def policy_field(policy: str, quota: int, window_seconds: float) -> tuple[str, str]:
    return (POLICY, f'"{policy}";q={quota};w={max(1, _seconds(window_seconds))}')


def remaining_field(policy: str, remaining: int, reset_seconds: float) -> tuple[str, str]:
    return (REMAINING, f'"{policy}";r={max(0, remaining)};t={_seconds(reset_seconds)}')
