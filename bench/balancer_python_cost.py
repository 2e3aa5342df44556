"""The balancer's own Python per proxied unary call, without grpc or sockets: the unary
handler (admission, identity, rate limit, stamp, budgets, pick, tunnel framing hand-off) run
in-process against a context that answers at once and a tunnel that replies at once.

    python bench/balancer_python_cost.py [--calls 50000] [--no-limit] [--no-budgets]

It is the share of ``bench/balancer_bench.py``'s CPU per call that the balancer's code itself
costs; the rest is grpc.aio (``bench/inbound_floor.py``) and the tunnel's I/O."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from hashmesh.balancer.backends import READY, BackendSet
from hashmesh.balancer.budgets import BudgetSettings
from hashmesh.balancer.config import BalancerSettings, parse_limit
from hashmesh.balancer.interceptors import build_chain
from hashmesh.balancer.proxy import Proxy
from hashmesh.balancer.ratelimit import RateLimiter
from hashmesh.balancer.stats import BalancerStats
from hashmesh.core.tunnel import Reply

METHOD = "/hashmesh.v1.HashService/Hash"


class AnsweringContext:
    """What the handler asks of grpc.aio's context, answered at once."""

    def __init__(self) -> None:
        self.done: list[Callable[[Any], None]] = []

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-client-id", "bench"), ("user-agent", "grpc-python/1.85"))

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.done.append(callback)

    def time_remaining(self) -> float:
        return 9.5

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        pass

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        pass


class AnsweringTunnel:
    unsupported = False
    max_payload = 1 << 18

    async def unary(self, method: str, metadata: Any, timeout: Any, payload: bytes) -> Reply:
        return Reply(1, grpc.StatusCode.OK, "", (), (), b"r" * 40)


class AnsweringTunnels:
    tunnel = AnsweringTunnel()

    def of(self, *args: Any) -> AnsweringTunnel:
        return self.tunnel


async def run(calls: int, limit: bool, budgets: bool) -> float:
    settings = BalancerSettings(
        backends=("127.0.0.1:1", "127.0.0.1:2"),
        strategy="least_connections",
        rate_limit=parse_limit("1000000/1000000") if limit else None,
        budgets=BudgetSettings(enabled=budgets),
    )
    backends = BackendSet(settings)
    for address in settings.backends:
        backends.add(address, "static").state = READY
    await backends.stop()  # no health checks: the replicas are never dialled
    backends._rebuild()
    stats = BalancerStats()
    chain = build_chain(None, RateLimiter(settings.rate_limit), stats, identity_secret="x" * 32)
    proxy = Proxy(settings, backends, chain, stats)
    proxy._tunnels = AnsweringTunnels()  # type: ignore[assignment]
    forward = proxy._unary(METHOD)
    request = b"q" * 40

    async def one() -> None:
        context = AnsweringContext()
        await forward(request, context)  # type: ignore[arg-type]
        for callback in context.done:
            callback(context)

    for _ in range(min(calls, 2000)):
        await one()
    started = time.perf_counter()
    for _ in range(calls):
        await one()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-limit", action="store_true")
    parser.add_argument("--no-budgets", action="store_true")
    args = parser.parse_args()
    results = sorted(
        asyncio.run(run(args.calls, not args.no_limit, not args.no_budgets))
        for _ in range(args.rounds)
    )
    print(
        f"balancer Python per unary call: {results[len(results) // 2]:.1f} us (median of {args.rounds})"
    )


if __name__ == "__main__":
    main()
