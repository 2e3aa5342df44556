"""What this process may use: CPUs and memory from its cgroup (a container's limits), else the
host's. Used to size argon2's threads and the largest ``memory_cost`` a replica accepts, so
that every CPU thread running a maximal argon2 call at once still fits the memory limit.

Reads cgroup v2 (``cpu.max``, ``memory.max``) and v1 (``cpu/cpu.cfs_quota_us`` +
``cpu.cfs_period_us``, ``memory/memory.limit_in_bytes``) in the process's own cgroup (from
``/proc/self/cgroup``) and its ancestors, the smallest limit winning; the parsing is pure, the
reading takes the cgroup root and paths as arguments (tests give a fake tree)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_NO_LIMIT = 1 << 62
"""cgroup v1 writes a huge number (about 2**63, page-rounded) for "no memory limit"."""
PROCESS_RESERVE_BYTES = 128 * 1024 * 1024
"""What a replica needs besides argon2's memory: the interpreter, gRPC, the pool, caches."""


@dataclass(frozen=True)
class Resources:
    """CPUs and memory this process may use."""

    cpus: float
    """CPUs: the cgroup's quota, else the CPUs this process may run on."""
    memory_bytes: int
    """Memory: the cgroup's limit, else the host's."""
    limited: bool
    """Whether either figure came from a cgroup limit (a container)."""

    @property
    def cpu_threads(self) -> int:
        """Threads that keep the CPUs busy without oversubscribing them."""
        return max(1, math.ceil(self.cpus))

    def argon2_memory_kib(self, threads: int, ceiling_kib: int) -> int:
        """The largest argon2 ``memory_cost`` (KiB) such that ``threads`` calls at once fit
        in memory beside the process itself; at most ``ceiling_kib``."""
        free = self.memory_bytes - PROCESS_RESERVE_BYTES
        return max(0, min(ceiling_kib, free // max(1, threads) // 1024))


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max``: ``"max 100000"`` (no limit) or ``"QUOTA PERIOD"``."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return int(parts[0]) / period if period > 0 else None


def parse_memory_max(text: str) -> int | None:
    """cgroup v2 ``memory.max`` (``"max"`` or bytes) or v1 ``memory.limit_in_bytes``."""
    value = text.strip()
    if not value or value == "max":
        return None
    number = int(value)
    return None if number >= V1_NO_LIMIT else number


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def own_cgroups(proc_self_cgroup: str) -> dict[str, str]:
    """``/proc/self/cgroup`` → controller → path: ``""`` for the v2 hierarchy, else each v1
    controller by name (``cpu,cpuacct`` lines count for both)."""
    paths: dict[str, str] = {}
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def _levels(root: Path, path: str) -> list[Path]:
    """The process's cgroup directory and each ancestor up to ``root``: a limit anywhere on
    the way applies. Inside a container the path may not exist (its own cgroup is mounted as
    the root): then only ``root`` is read."""
    levels, current = [], Path("/") / path.lstrip("/")
    while True:
        levels.append(root / current.relative_to("/"))
        if current == current.parent:
            return levels
        current = current.parent


def _smallest(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def cgroup_cpus(root: Path = CGROUP_ROOT, paths: dict[str, str] | None = None) -> float | None:
    paths = paths if paths is not None else own_cgroups(_read(Path("/proc/self/cgroup")) or "")
    found: list[float | None] = []
    for level in _levels(root, paths.get("", "/")):
        text = _read(level / "cpu.max")
        found.append(parse_cpu_max(text) if text is not None else None)
    for level in _levels(root / "cpu", paths.get("cpu", "/")):
        quota, period = _read(level / "cpu.cfs_quota_us"), _read(level / "cpu.cfs_period_us")
        if quota is not None and period is not None and int(quota) > 0 and int(period) > 0:
            found.append(int(quota) / int(period))
    return _smallest(found)


def cgroup_memory(root: Path = CGROUP_ROOT, paths: dict[str, str] | None = None) -> int | None:
    paths = paths if paths is not None else own_cgroups(_read(Path("/proc/self/cgroup")) or "")
    found: list[float | None] = []
    for level in _levels(root, paths.get("", "/")):
        text = _read(level / "memory.max")
        found.append(parse_memory_max(text) if text is not None else None)
    for level in _levels(root / "memory", paths.get("memory", "/")):
        text = _read(level / "memory.limit_in_bytes")
        found.append(parse_memory_max(text) if text is not None else None)
    smallest = _smallest(found)
    return int(smallest) if smallest is not None else None


def host_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect(root: Path = CGROUP_ROOT, paths: dict[str, str] | None = None) -> Resources:
    """This process's CPUs and memory: its cgroups' limits where set, else the host's."""
    cpus, memory = cgroup_cpus(root, paths), cgroup_memory(root, paths)
    return Resources(
        cpus=min(cpus, host_cpus()) if cpus is not None else float(host_cpus()),
        memory_bytes=min(memory, host_memory()) if memory is not None else host_memory(),
        limited=cpus is not None or memory is not None,
    )
