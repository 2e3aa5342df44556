"""Pinning the balancer's process to CPUs (``HASHMESH_BALANCER_CPUS``, ``--cpus``).

The balancer's Python work is serialised by the GIL whatever the number of cores: its event
loop, grpc's poller thread and, on the synchronous listener, the threads calls wait on, hand
the GIL to one another several times per call. On two cores those hand-offs cross cores and
wake threads there; on one core they are plain switches, and the per-call CPU of the
synchronous listener stops jumping between two modes (``bench/balancer_bench.py``, the
``balancer`` and ``balancer-unpinned`` fronts). ``hashctl up --balancers N`` gives each
process a core of its own.

Applied once, at start, before the listeners open: every thread that exists then is pinned,
and threads started later inherit the mask of the thread that starts them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hashmesh.core.settings import SettingsError

AUTO = "auto"


def parse_cpus(text: str) -> tuple[int, ...] | str:
    """``""`` or ``off`` -> ``()`` (no pinning); ``auto``; else CPU numbers and ranges,
    ``1`` or ``0,2`` or ``2-3``."""
    text = text.strip().lower()
    if text in ("", "off"):
        return ()
    if text == AUTO:
        return AUTO
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if (
            not first.isdigit()
            or (dash and not last.isdigit())
            or (last and int(last) < int(first))
        ):
            raise SettingsError(
                f"HASHMESH_BALANCER_CPUS must be off, auto or CPU numbers such as 1 or 0,2 or "
                f"2-3, not {text!r}"
            )
        cpus.extend(range(int(first), int(last or first) + 1))
    return tuple(sorted(set(cpus)))


def allowed_cpus() -> set[int] | None:
    """The CPUs this process may run on; ``None`` where the platform cannot pin (macOS has
    no ``sched_setaffinity``)."""
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return None
    return os.sched_getaffinity(0)


def chosen(cpus: Sequence[int] | str, allowed: set[int] | None, index: int = 0) -> tuple[int, ...]:
    """The CPUs to pin to: ``auto`` is one allowed CPU, the ``index``-th counted from the
    last (CPU 0 takes most interrupts and housekeeping), so that ``N`` processes started with
    indexes ``0..N-1`` each get a CPU of their own while there are enough. Explicit CPUs must
    all be allowed. Where the platform cannot pin (``allowed`` is ``None``), ``auto`` pins
    nothing and explicit CPUs are refused."""
    if allowed is None:
        if isinstance(cpus, str):
            return ()
        raise SettingsError("HASHMESH_BALANCER_CPUS names CPUs, but this platform cannot pin")
    if isinstance(cpus, str):  # AUTO: parse_cpus allows no other text
        ordered = sorted(allowed, reverse=True)
        return (ordered[index % len(ordered)],)
    wanted = {int(cpu) for cpu in cpus}
    if not wanted <= allowed:
        raise SettingsError(
            f"HASHMESH_BALANCER_CPUS names CPUs {sorted(wanted - allowed)} this process may not "
            f"run on (allowed: {sorted(allowed)})"
        )
    return tuple(sorted(wanted))


def pin(cpus: Sequence[int]) -> None:
    """Every thread of this process onto ``cpus`` (Linux applies a mask per thread)."""
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
