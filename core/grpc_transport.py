"""Which of grpc's two TCP transports a daemon (balancer, hashd) runs on, chosen before grpc
loads.

grpcio 1.85 carries two implementations of its sockets: the EventEngine (the default) reads
and writes every connection on threads of its own, whose completions then cross to grpc.aio's
poller thread and on to the event loop; the older iomgr polls the sockets in the thread that
waits for completions, which saves a thread hop per completion. For the balancer, which
forwards many small calls, iomgr costs 0.83-0.88x the CPU per call of the EventEngine on the
inbound side alone (``bench/inbound_floor.py``'s ``aio`` row with and without
``GRPC_EXPERIMENTS=-event_engine_listener,...``) and 0.85-0.95x for the whole balancer
(``bench/balancer_bench.py``, against the front ``balancer-event-engine``); hashd, a task's
busiest process, spends ~0.85x the CPU per task and ~25 % fewer wake-ups
(``bench/tasks_e2e.py``'s latency run, A/B). Both are grpc's own, switched
by its ``GRPC_EXPERIMENTS`` variable, which grpc reads once, when it is imported: so this
module imports no grpc and ``configure`` runs first in each daemon's ``__main__``.

``HASHMESH_GRPC_TRANSPORT`` = ``iomgr`` (the default) or ``event_engine``
(grpc's default). Experiments the operator names in ``GRPC_EXPERIMENTS`` are left as set."""

from __future__ import annotations

from collections.abc import MutableMapping

from hashmesh.core.settings import SettingsError

VARIABLE = "HASHMESH_GRPC_TRANSPORT"
TRANSPORTS = ("iomgr", "event_engine")
EVENT_ENGINE_EXPERIMENTS = (
    "event_engine_client",
    "event_engine_listener",
    "event_engine_for_all_other_endpoints",
)
"""The experiments that put grpc's TCP connections (client, listener, the rest) on the
EventEngine; each off (``-name``) is iomgr."""


def experiments(transport: str, current: str = "") -> str:
    """``GRPC_EXPERIMENTS`` for ``transport``, keeping what ``current`` already says."""
    if transport not in TRANSPORTS:
        raise SettingsError(f"{VARIABLE} must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
    named = [item.strip() for item in current.split(",") if item.strip()]
    if transport == "event_engine":
        return ",".join(named)
    mentioned = {item.lstrip("-") for item in named}
    added = [f"-{name}" for name in EVENT_ENGINE_EXPERIMENTS if name not in mentioned]
    return ",".join([*named, *added])


def configure(environ: MutableMapping[str, str]) -> str:
    """Sets ``GRPC_EXPERIMENTS`` in ``environ`` (the process's, before grpc is imported) for
    the transport ``HASHMESH_GRPC_TRANSPORT`` names; returns that transport."""
    transport = environ.get(VARIABLE, "").strip() or TRANSPORTS[0]
    value = experiments(transport, environ.get("GRPC_EXPERIMENTS", ""))
    if value:
        environ["GRPC_EXPERIMENTS"] = value
    return transport
