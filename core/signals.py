"""How a daemon learns it should stop: the one place hashd, workerd and the balancer handle
signals (no gRPC here, so workerd does not import the gRPC server frame for it)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable


async def wait_for_signal(
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> signal.Signals:
    """Block until one of ``signals`` arrives; the one place daemons handle signals."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def deliver(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig)

    for sig in signals:
        loop.add_signal_handler(sig, deliver, sig)
    try:
        return await received
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
