"""CPU and memory limits read from a cgroup tree (a fake one under tmp_path), and the hashd
settings they size: argon2 threads and the largest memory_cost accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from hashmesh.core import resources
from hashmesh.core.errors import InvalidArgument
from hashmesh.core.hashing.algorithms import Argon2Params, validate_phc
from hashmesh.core.resources import Resources
from hashmesh.core.settings import SettingsError
from hashmesh.hashd.config import HashdSettings

MiB = 1024 * 1024


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


def test_cgroup_v2_limits_are_read(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"cpu.max": "150000 100000", "memory.max": str(512 * MiB)})
    found = resources.detect(root, {"": "/"})
    assert found.cpus == 1.5 and found.cpu_threads == 2
    assert found.memory_bytes == 512 * MiB and found.limited


def test_no_limit_falls_back_to_the_host(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"cpu.max": "max 100000", "memory.max": "max"})
    found = resources.detect(root, {"": "/"})
    assert not found.limited
    assert found.cpus == resources.host_cpus() and found.memory_bytes == resources.host_memory()
    assert resources.detect(tmp_path / "missing", {}).limited is False


def test_cgroup_v1_and_the_smallest_limit_on_the_way_up(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "cpu/cpu.cfs_quota_us": "-1",
            "cpu/cpu.cfs_period_us": "100000",
            "cpu/app/cpu.cfs_quota_us": "100000",
            "cpu/app/cpu.cfs_period_us": "100000",
            "memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
            "memory/app/memory.limit_in_bytes": str(768 * MiB),
            "memory/app/job/memory.limit_in_bytes": str(1024 * MiB),  # the parent's 768 MiB wins
        },
    )
    paths = resources.own_cgroups("4:memory:/app/job\n1:cpu,cpuacct:/app\n0::/\n")
    assert paths == {"memory": "/app/job", "cpu": "/app", "cpuacct": "/app", "": "/"}
    found = resources.detect(root, paths)
    assert found.cpus == 1.0 and found.memory_bytes == 768 * MiB


def test_a_container_sees_its_own_cgroup_as_the_root(tmp_path: Path) -> None:
    # Docker on cgroup v1 mounts the container's cgroup at the root; /proc/self/cgroup still
    # names the host's path, which does not exist inside.
    root = _tree(tmp_path, {"memory/memory.limit_in_bytes": str(512 * MiB)})
    found = resources.detect(root, resources.own_cgroups("4:memory:/docker/0123abcd\n"))
    assert found.memory_bytes == 512 * MiB


def test_argon2_memory_is_what_every_thread_can_hold_at_once() -> None:
    limited = Resources(cpus=2.0, memory_bytes=384 * MiB, limited=True)
    # (384 - 128 reserved) MiB shared by 2 threads.
    assert limited.argon2_memory_kib(2, 256 * 1024) == 128 * 1024
    assert limited.argon2_memory_kib(1, 256 * 1024) == 256 * 1024  # capped by the protocol
    settings = HashdSettings(resources=limited, cpu_workers=2)
    assert settings.argon2_memory_limit_kib == 128 * 1024


def test_settings_that_cannot_fit_are_refused_at_start() -> None:
    small = Resources(cpus=4.0, memory_bytes=150 * MiB, limited=True)
    with pytest.raises(SettingsError, match="cannot hold 4 argon2 calls"):
        HashdSettings(resources=small, cpu_workers=4)
    roomy = Resources(cpus=2.0, memory_bytes=512 * MiB, limited=True)
    with pytest.raises(SettingsError, match="does not fit the memory limit of 512 MiB"):
        HashdSettings(resources=roomy, cpu_workers=2, argon2_max_memory_kib=256 * 1024)
    assert (
        HashdSettings(
            resources=roomy, cpu_workers=2, argon2_max_memory_kib=64 * 1024
        ).argon2_memory_limit_kib
        == 64 * 1024
    )
    with pytest.raises(SettingsError, match="between 8192 and 262144"):
        HashdSettings(resources=roomy, cpu_workers=1, argon2_max_memory_kib=1024)


def test_threads_default_from_the_cpu_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HASHMESH_HASHD_CPU_WORKERS", raising=False)
    monkeypatch.setattr(
        resources, "detect", lambda *_: Resources(cpus=1.5, memory_bytes=1024 * MiB, limited=True)
    )
    settings = HashdSettings.from_env()
    assert settings.cpu_workers == 2 and settings.argon2_memory_limit_kib == 256 * 1024
    monkeypatch.setenv("HASHMESH_HASHD_ARGON2_MAX_MEMORY_KIB", "65536")
    assert HashdSettings.from_env().argon2_memory_limit_kib == 65536


def test_requests_over_the_memory_limit_name_the_field() -> None:
    with pytest.raises(InvalidArgument) as refused:
        Argon2Params.build(
            memory_cost_kib=65537, memory_limit_kib=65536, field_prefix="specs[1].argon2"
        )
    assert refused.value.field == "specs[1].argon2.memory_cost_kib"
    assert "at most 65536 KiB on this server" in refused.value.description
    assert (
        Argon2Params.build(memory_cost_kib=65536, memory_limit_kib=65536).memory_cost_kib == 65536
    )
    encoded = "$argon2id$v=19$m=131072,t=1,p=1$c2FsdHNhbHQ$" + "A" * 43
    with pytest.raises(InvalidArgument, match="at most 65536 KiB"):
        validate_phc(encoded, memory_limit_kib=65536)
